"""Label issues: confident learning (cleanlab) on out-of-fold probabilities."""

from __future__ import annotations

import numpy as np

from featx.errors import require

__all__ = ["label_issues"]


def label_issues(proba: np.ndarray, codes: np.ndarray, classes: list[str], paths: list[str]) -> list[dict]:
    """One dict per image, most likely mislabelled first.

    ``score`` is cleanlab's label quality (the out-of-fold probability of the given label,
    ``self_confidence``; low = suspect), ``suggested`` the most probable class, and
    ``flagged`` cleanlab's own cut (``find_label_issues``, pruned by noise rate).
    """
    require("cleanlab", "audit")
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    flagged = find_label_issues(codes, proba, n_jobs=1)
    score = get_label_quality_scores(codes, proba, method="self_confidence")
    suggested = proba.argmax(axis=1)
    order = np.lexsort((np.arange(len(codes)), score))
    return [{"rank": r + 1, "path": paths[i], "given": classes[codes[i]], "suggested": classes[suggested[i]],
             "score": float(score[i]), "flagged": bool(flagged[i]), "row": int(i)}
            for r, i in enumerate(order.tolist())]
