"""Outliers: images far from their nearest neighbours, against the table's own distances."""

from __future__ import annotations

import numpy as np

__all__ = ["K_OUTLIER", "Z_FLAG", "outliers"]

#: neighbours whose mean similarity scores an image (one near copy does not hide an outlier)
K_OUTLIER = 10
#: robust z-score (median / MAD of the table's own scores) from which an image is flagged
Z_FLAG = 3.5


def outliers(index: np.ndarray, similarity: np.ndarray, paths: list[str], labels: list,
             k: int = K_OUTLIER) -> list[dict]:
    """One dict per image, farthest first, from a search of the table against itself.

    ``distance`` is 1 - the mean cosine similarity of the image's ``k`` nearest other
    images; ``percentile`` its rank among the table's distances; ``z`` the robust
    z-score (median and MAD of the table's distances), ``flagged`` when ``z >= Z_FLAG``.
    """
    n = len(paths)
    own = index == np.arange(n)[:, None]
    sims = np.where(own, np.nan, similarity.astype(np.float64))
    # drop the self column per row, keep the first k others
    others = np.sort(np.nan_to_num(sims, nan=-np.inf), axis=1)[:, ::-1][:, :k]
    others = np.where(np.isfinite(others), others, np.nan)
    dist = 1.0 - np.nanmean(others, axis=1)
    med = float(np.median(dist))
    mad = float(np.median(np.abs(dist - med))) * 1.4826 or 1e-12
    z = (dist - med) / mad
    pct = (np.argsort(np.argsort(dist, kind="stable"), kind="stable") + 1) / n * 100
    order = np.lexsort((np.arange(n), -dist))
    return [{"rank": r + 1, "path": paths[i], "label": labels[i], "distance": float(dist[i]),
             "percentile": float(pct[i]), "z": float(z[i]), "flagged": bool(z[i] >= Z_FLAG), "row": int(i)}
            for r, i in enumerate(order.tolist())]
