"""Predict with a head: images -> embeddings (through the shared cache) -> probabilities.

Files go through the engines' front door (``featx.engines.files``) into the same
embedding store as ``featx extract``, so an image embedded once is never run again.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.atomic import result_file, write_text
from featx.backbones.artifact import Backbone
from featx.csvout import csv_writer
from featx.embed.flip import TTA, flipped_embeddings
from featx.embed.scan import output_path
from featx.engines.files import collect_files, shared
from featx.errors import FeatXError
from featx.heads.headfile import Head, head_backbone, load_head
from featx.progress import ProgressFn, no_progress

__all__ = ["PredictResult", "predict", "write_predictions"]


@dataclass
class PredictResult:
    """Per-image predictions; ``files[i]`` has ``labels[i]`` and ``proba[i]`` (over ``classes``).

    ``labels[i]`` is None when the head abstained: its top probability was below
    ``min_proba``, or the image is ``unknown[i]``: farther from the head's training
    embeddings (``novelty[i]``, a cosine distance) than ``unknown_threshold``, the
    ``unknown_quantile`` of the training rows' own distances (``featx.heads.novelty``).
    ``unknown`` is empty when the head keeps no novelty sample or the check was turned
    off. ``sets[i, j]`` says whether class j is in image i's conformal prediction set at
    ``coverage`` (``featx.heads.conformal``); None unless a coverage was asked for.
    """

    files: list[str]
    labels: list[str | None]
    proba: np.ndarray
    classes: list[str]
    failures: list[tuple[str, str]] = field(default_factory=list)
    true_labels: list[str | None] = field(default_factory=list)
    provider: str = ""
    min_proba: float | None = None
    keys: list[str] = field(default_factory=list)  # content key of files[i]
    embeddings: np.ndarray | None = None  # row i embeds files[i]
    unknown: list[bool] = field(default_factory=list)
    novelty: np.ndarray | None = None
    unknown_threshold: float | None = None
    unknown_quantile: float | None = None
    sets: np.ndarray | None = None
    coverage: float | None = None

    @property
    def abstained(self) -> int:
        """Images left without a label: below ``min_proba`` or unknown."""
        return sum(lab is None for lab in self.labels)

    @property
    def n_unknown(self) -> int:
        return int(sum(self.unknown))

    def prediction_set(self, i: int) -> list[str]:
        """Image i's conformal prediction set, most probable class first (empty without sets)."""
        if self.sets is None:
            return []
        return [self.classes[j] for j in np.argsort(-self.proba[i], kind="stable") if self.sets[i, j]]

    def top_k(self, i: int, k: int) -> list[tuple[str, float]]:
        order = np.argsort(-self.proba[i], kind="stable")[:k]
        return [(self.classes[j], float(self.proba[i, j])) for j in order]

    def rows(self, k: int = 3) -> list[dict]:
        out = []
        for i, (f, lab) in enumerate(zip(self.files, self.labels, strict=True)):
            # "label" is the deprecated old name of "predicted" (one release)
            row = {"path": f, "predicted": lab, "label": lab, "probability": float(self.proba[i].max()),
                   "abstained": lab is None,
                   "top": [{"class": c, "probability": p} for c, p in self.top_k(i, k)]}
            if self.unknown:
                row.update(unknown=bool(self.unknown[i]), novelty=float(self.novelty[i]))
            if self.sets is not None:
                row["set"] = self.prediction_set(i)
            out.append(row)
        return out


def predict(head: Head | str | os.PathLike, inputs: list[str | os.PathLike], *,
            backbone: str | os.PathLike | Backbone | None = None, device: str = "auto",
            store: str | os.PathLike | None = None, batch_size: int = 32,
            workers: int | None = None, min_proba: float | None = None, tta: str = "none",
            unknown: bool = True, unknown_quantile: float | None = None,
            coverage: float | None = None,
            progress: ProgressFn = no_progress) -> PredictResult:
    """Predict every image in ``inputs`` (files and/or folders) with ``head``.

    ``tta="flip"`` averages the head's probabilities over each image and its mirror
    image (``featx.embed.flip``; the mirror images are embedded, not cached).

    The label is the class with the highest probability, or None (abstain) when that
    probability is below ``min_proba``, or when the image is unknown: farther from the
    head's training embeddings than the ``unknown_quantile`` (default: the head's, 0.99)
    of the training rows' own distances. ``unknown=False`` keeps the labels of such
    images (they are still flagged in ``result.unknown``). ``coverage`` (e.g. 0.9) adds
    conformal prediction sets. Unreadable files are listed in ``failures`` with their
    reason and do not stop the run.
    """
    if min_proba is not None and not 0.0 <= min_proba <= 1.0:
        raise FeatXError(f"min_proba must be between 0 and 1, got {min_proba}")
    if unknown_quantile is not None and not 0.0 < unknown_quantile <= 1.0:
        raise FeatXError(f"the unknown quantile must be in (0, 1], got {unknown_quantile}")
    h = head if isinstance(head, Head) else load_head(head)
    if coverage is not None and h.conformal is None:
        raise FeatXError(f"head {h.path or ''} keeps no conformal scores, so it cannot give prediction "
                         "sets; fit it with `featx fit-head --C auto` (logreg) to have them")
    bb = head_backbone(h, backbone)
    files, truth, skipped = collect_files(list(inputs))
    if not files:
        raise FeatXError(f"no images found in {', '.join(map(str, inputs))}")
    single_dir = inputs[0] if len(inputs) == 1 and Path(inputs[0]).is_dir() else None
    door = shared(bb, device, store)
    done = door.files(files, batch_size=batch_size, workers=workers, data_root=single_dir, progress=progress)
    X, ok, failures = done.rows(), done.ok, list(done.failures)
    keys = [str(done.keys[i]) for i in ok]
    if tta not in TTA:
        raise FeatXError(f"tta must be one of {', '.join(TTA)}, got {tta!r}")
    proba = h.proba(X)
    if tta == "flip" and len(ok):
        flipped = flipped_embeddings([files[i] for i in ok], door.encoder, batch_size=batch_size, workers=workers,
                                     progress=progress)
        proba = (proba + h.proba(flipped)) / 2
    classes = h.class_columns()
    labels: list[str | None] = [classes[j] for j in proba.argmax(axis=1)] if len(proba) else []
    if min_proba is not None and len(proba):
        labels = [lab if p >= min_proba else None for lab, p in zip(labels, proba.max(axis=1),
                                                                     strict=True)]
    result = PredictResult([files[i] for i in ok], labels, proba, classes, skipped + failures,
                           [truth[i] for i in ok], door.encoder.provider, min_proba, keys, X)
    return flag_and_sets(result, h, X, unknown=unknown, unknown_quantile=unknown_quantile,
                         coverage=coverage)


def flag_and_sets(result: PredictResult, h: Head, X: np.ndarray, *, unknown: bool = True,
                  unknown_quantile: float | None = None,
                  coverage: float | None = None) -> PredictResult:
    """Add the unknown flags (and clear those labels when ``unknown``) and conformal sets."""
    if h.novelty is not None:
        result.novelty = h.novelty.score(X)
        result.unknown_quantile = h.novelty.quantile if unknown_quantile is None else unknown_quantile
        result.unknown_threshold = h.novelty.threshold(result.unknown_quantile)
        result.unknown = (result.novelty > result.unknown_threshold).tolist()
        if unknown:
            result.labels = [None if u else lab for lab, u in zip(result.labels, result.unknown,
                                                                   strict=True)]
    if coverage is not None and h.conformal is not None:
        result.sets = h.conformal.sets(result.proba, coverage)
        result.coverage = coverage
    return result


def write_predictions(result: PredictResult, out: str | os.PathLike, top_k: int = 3) -> Path:
    """CSV/TSV (path, label, probability, top-k class/probability columns, unknown, novelty,
    set, error) or JSON, by suffix.

    An abstention (top probability below ``min_proba``, or an unknown image) has an empty
    label in CSV and ``null`` in JSON; its top-k columns still hold the probabilities.
    ``unknown`` (true/false) and ``novelty`` (the distance to the training embeddings) are
    there when the head keeps a novelty sample, ``set`` (classes joined by ``|``) when a
    coverage was asked for. Written atomically.
    """
    out, suffix = result_file(out)
    k = max(1, min(top_k, len(result.classes)))
    if suffix == ".json":
        doc = {"classes": result.classes, "min_proba": result.min_proba,
               "unknown_quantile": result.unknown_quantile,
               "unknown_threshold": result.unknown_threshold, "coverage": result.coverage,
               "predictions": [{**r, "path": output_path(r["path"])} for r in result.rows(k)],
               "failures": [{"path": output_path(p), "reason": r} for p, r in result.failures]}
        return write_text(out, json.dumps(doc, indent=2))
    buf = io.StringIO(newline="")
    w = csv_writer(buf, delimiter="\t" if suffix == ".tsv" else ",")
    # `predicted`, as evaluate's predictions.csv (featx's `label` is a given label); the old
    # `label` column stays, last, for one release (docs/heads.md)
    head = ["path", "predicted", "probability"]
    for j in range(1, k + 1):
        head += [f"top{j}_class", f"top{j}_probability"]
    extra = (["unknown", "novelty"] if result.unknown else []) + (["set"] if result.sets is not None else [])
    w.writerow([*head, *extra, "error", "label"])
    for i, (path, lab) in enumerate(zip(result.files, result.labels, strict=True)):
        row = [output_path(path), lab or "", f"{result.proba[i].max():.6f}"]
        for c, p in result.top_k(i, k):
            row += [c, f"{p:.6f}"]
        row += ["", ""] * (k - len(result.top_k(i, k)))
        if result.unknown:
            row += ["true" if result.unknown[i] else "false", f"{result.novelty[i]:.6f}"]
        if result.sets is not None:
            row.append("|".join(result.prediction_set(i)))
        w.writerow([*row, "", lab or ""])
    for path, why in result.failures:
        w.writerow([output_path(path), "", ""] + [""] * (2 * k + len(extra)) + [why, ""])
    return write_text(out, buf.getvalue())
