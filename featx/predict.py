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
from featx.embed.scan import display_path
from featx.engines.files import array_key, collect_files, embed_arrays, embed_paths, runtime, shared
from featx.errors import FeatXError
from featx.heads.headfile import Head, head_backbone, load_head
from featx.heads.proba import head_class_columns, head_proba
from featx.progress import ProgressFn, no_progress

# the front door's names (featx.engines.files) stay importable from here for older callers
__all__ = ["PredictResult", "array_key", "collect_files", "embed_arrays", "embed_paths", "predict",
           "runtime", "write_predictions"]


@dataclass
class PredictResult:
    """Per-image predictions; ``files[i]`` has ``labels[i]`` and ``proba[i]`` (over ``classes``).

    ``labels[i]`` is None when the head abstained: its top probability was below
    ``min_proba``.
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

    @property
    def abstained(self) -> int:
        return sum(lab is None for lab in self.labels)

    def top_k(self, i: int, k: int) -> list[tuple[str, float]]:
        order = np.argsort(-self.proba[i], kind="stable")[:k]
        return [(self.classes[j], float(self.proba[i, j])) for j in order]

    def rows(self, k: int = 3) -> list[dict]:
        return [{"path": f, "label": lab, "probability": float(self.proba[i].max()),
                 "abstained": lab is None,
                 "top": [{"class": c, "probability": p} for c, p in self.top_k(i, k)]}
                for i, (f, lab) in enumerate(zip(self.files, self.labels, strict=True))]


def predict(head: Head | str | os.PathLike, inputs: list[str | os.PathLike], *,
            backbone: str | os.PathLike | Backbone | None = None, device: str = "auto",
            store: str | os.PathLike | None = None, batch_size: int = 32,
            workers: int | None = None, min_proba: float | None = None, tta: str = "none",
            progress: ProgressFn = no_progress) -> PredictResult:
    """Predict every image in ``inputs`` (files and/or folders) with ``head``.

    ``tta="flip"`` averages the head's probabilities over each image and its mirror
    image (``featx.embed.flip``; the mirror images are embedded, not cached).

    The label is the class with the highest probability, or None (abstain) when that
    probability is below ``min_proba``. Unreadable files are listed in ``failures``
    with their reason and do not stop the run.
    """
    if min_proba is not None and not 0.0 <= min_proba <= 1.0:
        raise FeatXError(f"min_proba must be between 0 and 1, got {min_proba}")
    h = head if isinstance(head, Head) else load_head(head)
    bb = head_backbone(h, backbone)
    files, truth, skipped = collect_files(list(inputs))
    if not files:
        raise FeatXError(f"no images found in {', '.join(map(str, inputs))}")
    single_dir = inputs[0] if len(inputs) == 1 and Path(inputs[0]).is_dir() else None
    done = shared(bb, device, store).files(files, batch_size=batch_size, workers=workers,
                                           data_root=single_dir, progress=progress)
    X, ok, failures = done.rows(), done.ok, list(done.failures)
    keys = [str(done.keys[i]) for i in ok]
    if tta not in TTA:
        raise FeatXError(f"tta must be one of {', '.join(TTA)}, got {tta!r}")
    proba = head_proba(h, X)
    if tta == "flip" and len(ok):
        enc, _ = runtime(bb, device, store)
        flipped = flipped_embeddings([files[i] for i in ok], enc, batch_size=batch_size, workers=workers,
                                     progress=progress)
        proba = (proba + head_proba(h, flipped)) / 2
    classes = head_class_columns(h)
    labels: list[str | None] = [classes[j] for j in proba.argmax(axis=1)] if len(proba) else []
    if min_proba is not None and len(proba):
        labels = [lab if p >= min_proba else None for lab, p in zip(labels, proba.max(axis=1),
                                                                     strict=True)]
    enc, _ = runtime(bb, device, store)
    return PredictResult([files[i] for i in ok], labels, proba, classes, skipped + failures,
                         [truth[i] for i in ok], enc.provider, min_proba, keys, X)


def write_predictions(result: PredictResult, out: str | os.PathLike, top_k: int = 3) -> Path:
    """CSV/TSV (path, label, probability, top-k class/probability columns, error) or JSON, by suffix.

    An abstention (top probability below ``min_proba``) has an empty label in CSV and
    ``null`` in JSON; its top-k columns still hold the probabilities. Written atomically.
    """
    out, suffix = result_file(out)
    k = max(1, min(top_k, len(result.classes)))
    if suffix == ".json":
        doc = {"classes": result.classes, "min_proba": result.min_proba,
               "predictions": [{**r, "path": display_path(r["path"])} for r in result.rows(k)],
               "failures": [{"path": display_path(p), "reason": r} for p, r in result.failures]}
        return write_text(out, json.dumps(doc, indent=2))
    buf = io.StringIO(newline="")
    w = csv_writer(buf, delimiter="\t" if suffix == ".tsv" else ",")
    head = ["path", "label", "probability"]
    for j in range(1, k + 1):
        head += [f"top{j}_class", f"top{j}_probability"]
    w.writerow([*head, "error"])
    for i, (path, lab) in enumerate(zip(result.files, result.labels, strict=True)):
        row = [display_path(path), lab or "", f"{result.proba[i].max():.6f}"]
        for c, p in result.top_k(i, k):
            row += [c, f"{p:.6f}"]
        row += ["", ""] * (k - len(result.top_k(i, k)))
        w.writerow([*row, ""])
    for path, why in result.failures:
        w.writerow([display_path(path), "", ""] + [""] * (2 * k) + [why])
    return write_text(out, buf.getvalue())
