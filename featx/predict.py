"""Predict with a head: images -> embeddings (through the shared cache) -> probabilities.

Files go through ``featx.engines.local.embed_files`` into the same embedding store
as ``featx extract``, so an image embedded once is never run again. In-memory
uint8 arrays (the sklearn API) are keyed by a hash of their pixels and shape
and cached in the same store.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.atomic import result_file, write_text
from featx.backbones.artifact import Backbone
from featx.embed.flip import TTA, flipped_embeddings
from featx.embed.images import IMAGE_EXTENSIONS, array_to_pil, resize_crop
from featx.embed.runtime import Encoder
from featx.embed.scan import (
    display_path,
    image_by_content,
    is_table_file,
    resolve_item_path,
    scan,
    scan_table,
)
from featx.embed.statcache import StatCache
from featx.embed.store import EmbeddingStore, ShardWriter
from featx.engines.local import embed_files
from featx.errors import FeatXError
from featx.heads.headfile import Head, head_backbone, load_head
from featx.heads.proba import head_class_columns, head_proba
from featx.progress import ProgressFn, no_progress

_RUNTIMES: dict[tuple, tuple[Encoder, EmbeddingStore]] = {}
_LOCK = threading.Lock()


def runtime(bb: Backbone, device: str = "auto",
            store: str | os.PathLike | None = None) -> tuple[Encoder, EmbeddingStore]:
    """One encoder and store per (backbone, device, store) in this process.

    Opening an ORT session costs ~0.5 s; GridSearchCV clones an estimator per fold
    and candidate, so they all share this one.
    """
    key = (bb.fingerprint, str(bb.onnx_path), device, str(store) if store is not None else None,
           os.environ.get("FEATX_HOME"))
    with _LOCK:
        if key not in _RUNTIMES:
            _RUNTIMES[key] = (Encoder(bb, device=device), EmbeddingStore(bb, store))
        return _RUNTIMES[key]


def collect_files(inputs: list[str | os.PathLike]) -> tuple[list[str], list[str | None], list[tuple[str, str]]]:
    """Files from image files, folders (recursively) and CSV/TSV/Parquet tables of paths;
    returns (files, labels, skipped).

    Labels come from an ImageFolder layout (root/<class>/...) or a table's label
    column, and are None otherwise.
    """
    files: list[str] = []
    labels: list[str | None] = []
    skipped: list[tuple[str, str]] = []
    for inp in inputs:
        p = Path(inp)
        if p.is_dir() or is_table_file(p):
            found = scan(p) if p.is_dir() else scan_table(p)
            files.extend(resolve_item_path(found.root, it.path) for it in found.items)
            labels.extend(it.label for it in found.items)
            skipped.extend((resolve_item_path(found.root, s), why) for s, why in found.skipped)
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_EXTENSIONS and not image_by_content(p):
                skipped.append((str(p), f"not an image (extension {p.suffix or 'none'}, no image signature)"))
                continue
            files.append(str(p))
            labels.append(None)
        else:
            raise FeatXError(f"{p}: no such file or directory")
    return files, labels, skipped


def embed_paths(files: list[str], bb: Backbone, *, device: str = "auto",
                store: str | os.PathLike | None = None, batch_size: int = 32,
                workers: int | None = None, data_root: str | os.PathLike | None = None,
                progress: ProgressFn = no_progress) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Embeddings of the readable ``files``: (X, indices of those files, failures).

    With ``data_root`` (the one folder the files come from), the stat record that
    ``featx extract`` keeps for that folder is used, so unchanged files are not re-read.
    """
    encoder, st = runtime(bb, device, store)
    cache = StatCache(st.root, data_root) if data_root is not None else None
    keys, stats = embed_files(files, encoder, st, batch_size=batch_size, workers=workers,
                              stat_cache=cache, progress=progress)
    ok = [i for i, k in enumerate(keys) if k is not None]
    X = st.get([keys[i] for i in ok]) if ok else np.zeros((0, bb.dim), np.float32)
    return X, ok, list(stats.failures)


def array_key(a: np.ndarray) -> str:
    """Cache key of an in-memory image: its pixels and shape (distinct from file-byte keys)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"array:{a.dtype}:{a.shape}:".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def embed_arrays(images, bb: Backbone, *, device: str = "auto",
                 store: str | os.PathLike | None = None, batch_size: int = 32,
                 shard_size: int = 2048) -> np.ndarray:
    """Embeddings of uint8 images (an (N,H,W) / (N,H,W,3) array or a list of (H,W[,3]) arrays).

    Cached in the store under a hash of each image's pixels. An image for which the
    backbone gives NaN or inf is not stored, and a FeatXError names it (after the
    others are stored).
    """
    encoder, st = runtime(bb, device, store)
    keys = [array_key(a) for a in images]
    stored = st.stored(keys)
    todo: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k not in stored and k not in todo:
            todo[k] = i
    items = list(todo.items())
    refused: list[int] = []
    # the writer flushes when the block ends, even by an error or Ctrl-C: keep what is embedded
    with ShardWriter(st, shard_size) as writer:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            pixels = np.stack([resize_crop(array_to_pil(np.asarray(images[i]), f"image {i}"),
                                           bb.preprocess) for _, i in batch])
            bad = writer.add([k for k, _ in batch], encoder(pixels))
            refused.extend(batch[j][1] for j in bad)
    if refused:
        which = ", ".join(map(str, refused[:10])) + (" ..." if len(refused) > 10 else "")
        raise FeatXError(f"image{'s' if len(refused) > 1 else ''} {which}: the backbone gave NaN or inf "
                         "embeddings; they were not stored (the other images were)")
    return st.get(keys) if keys else np.zeros((0, bb.dim), np.float32)


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
    X, ok, failures = embed_paths(files, bb, device=device, store=store, batch_size=batch_size,
                                  workers=workers, data_root=single_dir, progress=progress)
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
                         [truth[i] for i in ok], enc.provider, min_proba)


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
    w = csv.writer(buf, delimiter="\t" if suffix == ".tsv" else ",")
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
