"""Embedding store: Parquet shards, one namespace per backbone fingerprint.

``<root>/<fingerprint>/shard-*.parquet`` hold (key, embedding) rows, keyed
by content hash. Shards are immutable and published by rename, so readers
never see half a shard and a killed writer loses only rows it had not yet
flushed. Concurrent writers use unique shard names; a key written twice is
deduplicated on read (both rows hold the same embedding).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from featx.backbones.artifact import Backbone
from featx.errors import MismatchError, StoreError
from featx.paths import default_store

STORE_FORMAT = 1


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def _store_error(path: Path, e: OSError) -> StoreError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        why = "the disk is full (or a size limit was hit)"
    elif e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        why = "it is not writable"
    else:
        why = e.strerror or str(e)
    return StoreError(f"cannot write to the embedding store at {path}: {why}. "
                      "Nothing stored so far was lost; free space or pass --store DIR.")


class EmbeddingStore:
    """The cached embeddings of one backbone."""

    def __init__(self, backbone: Backbone, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_store()
        self.fingerprint = backbone.fingerprint
        self.dim = backbone.dim
        self.dir = self.root / self.fingerprint
        self._shard_keys: dict[str, list[str]] = {}
        self._check_format(backbone)

    def _check_format(self, backbone: Backbone) -> None:
        fmt_file = self.root / "FORMAT"
        meta_file = self.dir / "meta.json"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.root / ".lock")):
                if not fmt_file.exists():
                    fmt_file.write_text(json.dumps({"featx_store_format": STORE_FORMAT}))
                if not meta_file.exists():
                    tmp = meta_file.with_suffix(f".{uuid.uuid4().hex}.tmp")
                    tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "dim": self.dim,
                                               "backbone": backbone.name}))
                    os.replace(tmp, meta_file)
        except OSError as e:
            if not fmt_file.exists():
                raise _store_error(self.root, e) from None
        fmt = json.loads(fmt_file.read_text()).get("featx_store_format")
        if fmt != STORE_FORMAT:
            raise StoreError(
                f"{self.root} was written by store format {fmt}; this featx reads format "
                f"{STORE_FORMAT}. Point --store at a new directory (embeddings are recomputed)."
            )
        if meta_file.exists():
            dim = json.loads(meta_file.read_text()).get("dim")
            if dim != self.dim:
                raise MismatchError(f"{self.dir}: stored embeddings have dim {dim}, backbone gives {self.dim}")

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.parquet"))

    def _keys_of(self, shard: Path) -> list[str]:
        if shard.name not in self._shard_keys:  # shards are immutable: cache their keys
            self._shard_keys[shard.name] = _read(shard, ["key"]).column("key").to_pylist()
        return self._shard_keys[shard.name]

    def keys(self) -> set[str]:
        """Every key stored for this backbone."""
        out: set[str] = set()
        for s in self.shards():
            out.update(self._keys_of(s))
        return out

    def get(self, keys: list[str]) -> np.ndarray:
        """Embeddings for ``keys`` in that order; KeyError names a missing key."""
        if not keys:
            return np.zeros((0, self.dim), np.float32)
        return next(self.iter_get(keys, len(keys)))

    def iter_get(self, keys: list[str], chunk: int = 4096) -> Iterator[np.ndarray]:
        """Embeddings for ``keys`` in order, ``chunk`` rows at a time.

        Memory: one chunk plus the shards it draws from, not the whole table.
        """
        want = set(keys)
        loc: dict[str, tuple[Path, int]] = {}
        for s in self.shards():
            for r, k in enumerate(self._keys_of(s)):
                if k in want and k not in loc:  # first copy wins; concurrent writers may duplicate
                    loc[k] = (s, r)
        missing = want - loc.keys()
        if missing:
            raise KeyError(next(iter(missing)))
        for start in range(0, len(keys), chunk):
            part = keys[start:start + chunk]
            out = np.empty((len(part), self.dim), np.float32)
            by_shard: dict[Path, tuple[list[int], list[int]]] = {}
            for i, k in enumerate(part):
                s, r = loc[k]
                rows, dest = by_shard.setdefault(s, ([], []))
                rows.append(r)
                dest.append(i)
            for s, (rows, dest) in by_shard.items():
                out[dest] = _embeddings(_read(s, ["embedding"]), self.dim)[rows]
            yield out

    def write(self, keys: list[str], embeddings: np.ndarray) -> Path | None:
        """Publish one shard atomically (temp name + rename)."""
        if not keys:
            return None
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.shape != (len(keys), self.dim):
            raise MismatchError(f"embeddings {emb.shape} do not match {len(keys)} keys x dim {self.dim}")
        name = f"shard-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        final = self.dir / name
        tmp = self.dir / f".tmp-{name}"
        table = pa.table({"key": pa.array(keys, pa.string()), "embedding": embedding_column(emb)})
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, final)
        except OSError as e:
            with contextlib.suppress(OSError):  # on a read-only store even this fails
                tmp.unlink(missing_ok=True)
            raise _store_error(self.dir, e) from None
        self._shard_keys[name] = list(keys)
        return final


def _read(path: Path, columns: list[str] | None = None) -> pa.Table:
    # ParquetFile, not pq.read_table: the latter imports pyarrow.dataset (~0.2 s per process)
    return pq.ParquetFile(path).read(columns=columns)


def embedding_column(emb: np.ndarray) -> pa.FixedSizeListArray:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])


def _embeddings(table: pa.Table, dim: int) -> np.ndarray:
    col = table.column("embedding").combine_chunks()
    flat = col.values.to_numpy(zero_copy_only=False)
    return flat.reshape(-1, dim).astype(np.float32, copy=False)


def embeddings_of(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column of a featx table as float32 (N, dim)."""
    col = table.column("embedding")
    dim = col.type.list_size
    return _embeddings(table, dim)
