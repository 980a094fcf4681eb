"""The one front door for "embed these images through the store and give me their rows".

Every job that needs embeddings of files or in-memory images comes here:
``featx extract`` (``LocalEngine``), predict, evaluate, the estimators, similarity,
compare, compare-features and fine-tuning's LP init. A ``FileEmbedder`` is an
encoder and its backbone's store; ``FileEmbedder.files`` makes sure every readable
file has a row in the store (``engines.local.embed_files``: content keys, cached rows
reused, a stat record skipping unchanged files) and ``FileEmbedder.arrays`` does the
same for uint8 arrays, keyed by a hash of their pixels. ``shared`` keeps one per
(backbone, device, store) in the process, so estimators cloned by GridSearchCV share
one ONNX Runtime session.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx.backbones.artifact import Backbone
from featx.embed.images import IMAGE_EXTENSIONS, array_to_pil, resize_crop
from featx.embed.runtime import Encoder
from featx.embed.scan import image_by_content, is_table_file, resolve_item_path, scan, scan_table
from featx.embed.statcache import StatCache
from featx.embed.store import EmbeddingStore, ShardWriter
from featx.engines.local import embed_files
from featx.engines.result import EmbedStats, EngineRun, ExtractJob
from featx.errors import FeatXError
from featx.progress import ProgressFn, no_progress

__all__ = ["Embedded", "FileEmbedder", "LocalEngine", "array_key", "collect_files", "embed_arrays",
           "embed_paths", "shared"]


@dataclass
class Embedded:
    """What ``FileEmbedder.files`` did: each file's content key (None = failed) and the stats.

    The rows stay in the store until ``rows()`` reads them, so a caller that wants a
    subset later (compare's training sizes) reads only that.
    """

    keys: list[str | None]
    stats: EmbedStats
    store: EmbeddingStore

    @property
    def ok(self) -> list[int]:
        """Indices of the files that have an embedding."""
        return [i for i, k in enumerate(self.keys) if k is not None]

    @property
    def failures(self) -> list[tuple[str, str]]:
        return self.stats.failures

    def rows(self) -> np.ndarray:
        """The embeddings of the readable files, in file order (float32, (n, dim))."""
        ok = self.ok
        return self.store.get([self.keys[i] for i in ok]) if ok \
            else np.zeros((0, self.store.dim), np.float32)


@dataclass
class FileEmbedder:
    """An encoder and its backbone's store: files and arrays embedded through the cache."""

    encoder: Encoder
    store: EmbeddingStore

    @classmethod
    def open(cls, bb: Backbone, device: str = "auto",
             store: str | os.PathLike | None = None) -> FileEmbedder:
        """A new encoder (an ONNX Runtime session) on ``device`` and ``bb``'s store under ``store``."""
        return cls(Encoder(bb, device=device), EmbeddingStore(bb, store))

    @property
    def backbone(self) -> Backbone:
        return self.encoder.backbone

    @property
    def provider(self) -> str:
        return self.encoder.provider

    def files(self, files: list[str], *, batch_size: int = 32, workers: int | None = None,
              draft: bool = True, shard_size: int = 2048, data_root: str | os.PathLike | None = None,
              progress: ProgressFn = no_progress) -> Embedded:
        """Make sure every readable file in ``files`` has a row in the store.

        With ``data_root`` (the one folder the files come from), the stat record that
        ``featx extract`` keeps for that folder is used, so unchanged files are not re-read.
        """
        cache = StatCache(self.store.root, data_root) if data_root is not None else None
        keys, stats = embed_files(files, self.encoder, self.store, batch_size=batch_size, workers=workers,
                                  draft=draft, shard_size=shard_size, stat_cache=cache, progress=progress)
        return Embedded(keys, stats, self.store)

    def arrays(self, images, *, batch_size: int = 32, shard_size: int = 2048,
               progress: ProgressFn = no_progress) -> np.ndarray:
        """Embeddings of uint8 images (an (N,H,W) / (N,H,W,3) array or a list of (H,W[,3]) arrays).

        Cached in the store under a hash of each image's pixels. An image for which the
        backbone gives NaN or inf is not stored, and a FeatXError names it (after the
        others are stored). Reports ``progress("embed", stored, not yet stored)``.
        """
        encoder, st, bb = self.encoder, self.store, self.backbone
        keys = [array_key(a) for a in images]
        stored = st.stored(keys)
        todo: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in stored and k not in todo:
                todo[k] = i
        items = list(todo.items())
        refused: list[int] = []
        # the writer flushes when the block ends, even by an error or Ctrl-C: keep what is embedded
        progress("embed", 0, len(items))
        with ShardWriter(st, shard_size) as writer:
            for start in range(0, len(items), batch_size):
                batch = items[start:start + batch_size]
                pixels = np.stack([resize_crop(array_to_pil(np.asarray(images[i]), f"image {i}"),
                                               bb.preprocess) for _, i in batch])
                bad = writer.add([k for k, _ in batch], encoder(pixels))
                refused.extend(batch[j][1] for j in bad)
                progress("embed", start + len(batch), len(items))
        if refused:
            which = ", ".join(map(str, refused[:10])) + (" ..." if len(refused) > 10 else "")
            raise FeatXError(f"image{'s' if len(refused) > 1 else ''} {which}: the backbone gave NaN or inf "
                             "embeddings; they were not stored (the other images were)")
        return st.get(keys) if keys else np.zeros((0, bb.dim), np.float32)


_SHARED: dict[tuple, FileEmbedder] = {}
_LOCK = threading.Lock()


def shared(bb: Backbone, device: str = "auto", store: str | os.PathLike | None = None) -> FileEmbedder:
    """One ``FileEmbedder`` per (backbone, device, store) in this process.

    Opening an ORT session costs ~0.5 s; GridSearchCV clones an estimator per fold
    and candidate, so they all share this one.
    """
    key = (bb.fingerprint, str(bb.onnx_path), device, str(store) if store is not None else None,
           os.environ.get("FEATX_HOME"))
    with _LOCK:
        if key not in _SHARED:
            _SHARED[key] = FileEmbedder.open(bb, device, store)
        return _SHARED[key]


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
    """Embeddings of the readable ``files`` (the ``shared`` FileEmbedder): (X, indices of those files, failures).

    With ``data_root`` (the one folder the files come from), the stat record that
    ``featx extract`` keeps for that folder is used, so unchanged files are not re-read.
    """
    done = shared(bb, device, store).files(files, batch_size=batch_size, workers=workers,
                                           data_root=data_root, progress=progress)
    return done.rows(), done.ok, list(done.failures)


def array_key(a: np.ndarray) -> str:
    """Cache key of an in-memory image: its pixels and shape (distinct from file-byte keys)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"array:{a.dtype}:{a.shape}:".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def embed_arrays(images, bb: Backbone, *, device: str = "auto",
                 store: str | os.PathLike | None = None, batch_size: int = 32,
                 shard_size: int = 2048, progress: ProgressFn = no_progress) -> np.ndarray:
    """Embeddings of uint8 images through the ``shared`` FileEmbedder (``FileEmbedder.arrays``)."""
    return shared(bb, device, store).arrays(images, batch_size=batch_size, shard_size=shard_size,
                                            progress=progress)


class LocalEngine:
    """Threads on this machine: readers decode while ONNX Runtime runs the model."""

    name = "local"

    def run(self, job: ExtractJob) -> EngineRun:
        """Embed ``job``'s files into its store; failures are paths relative to the root."""
        embedder = FileEmbedder(Encoder(job.backbone, device=job.device), job.store)
        files = [resolve_item_path(job.root, it.path) for it in job.found.items]
        done = embedder.files(files, batch_size=job.batch_size, workers=job.workers, draft=job.draft,
                              shard_size=job.shard_size, data_root=job.root, progress=job.progress)
        rel = dict(zip(files, (it.path for it in job.found.items), strict=True))
        done.stats.failures = [(rel.get(p, p), why) for p, why in done.stats.failures]
        return EngineRun(done.keys, done.stats, embedder.provider)
