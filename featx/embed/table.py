"""The ``--out`` table: one row per image (path, label, key, embedding) + featx metadata.

Plain Parquet, readable by pandas/pyarrow without featx; the backbone
fingerprint and data root travel in the schema metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featx.embed.store import embedding_column, embeddings_of
from featx.errors import FeatXError

META_KEY = b"featx"


@dataclass
class EmbeddingTable:
    """Embeddings of a set of images, in the order they were scanned."""

    paths: list[str]
    labels: list[str | None]
    keys: list[str]
    X: np.ndarray | None  # None when only written to disk (see featx.extract, keep_embeddings)
    meta: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return self.meta.get("fingerprint", "")

    @property
    def labelled(self) -> bool:
        return bool(self.labels) and all(lbl is not None for lbl in self.labels)

    def __len__(self) -> int:
        return len(self.paths)


def write_table(path: str | os.PathLike, t: EmbeddingTable,
                chunks: Iterable[np.ndarray] | None = None) -> Path:
    """Write ``t`` atomically as Parquet; an unwritable destination raises FeatXError.

    The embeddings come from ``t.X``, or from ``chunks`` (consecutive row blocks,
    in order), written one row group at a time so memory stays flat.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FeatXError(f"cannot create {path.parent}: {e.strerror or e}") from None
    dim = int(t.meta.get("dim") or (t.X.shape[1] if t.X is not None and t.X.ndim == 2 else 0))
    if chunks is None:
        X = t.X if t.X is not None and len(t.paths) else np.zeros((0, dim), np.float32)
        chunks = [X.reshape(len(t.paths), dim)]
    schema = pa.schema([("path", pa.string()), ("label", pa.string()), ("key", pa.string()),
                        ("embedding", pa.list_(pa.float32(), dim))],
                       metadata={META_KEY: json.dumps(t.meta).encode()})
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with pq.ParquetWriter(tmp, schema) as w:
            start = 0
            for emb in chunks:
                end = start + len(emb)
                w.write_table(pa.Table.from_arrays([
                    pa.array(t.paths[start:end], pa.string()), pa.array(t.labels[start:end], pa.string()),
                    pa.array(t.keys[start:end], pa.string()),
                    embedding_column(emb) if len(emb) else pa.array([], pa.list_(pa.float32(), dim)),
                ], schema=schema))
                start = end
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise FeatXError(f"cannot write the table {path}: {e.strerror or e}. The embeddings are in "
                         "the store; fix this and run the same command again (nothing is recomputed).") from None
    return path


def read_table(path: str | os.PathLike) -> EmbeddingTable:
    """Read a table written by ``featx extract`` (a file, or a directory of such files)."""
    path = Path(path)
    if not path.exists():
        raise FeatXError(f"{path}: no such embeddings table; run `featx extract` first")
    try:
        # a single file without pyarrow.dataset (slow to import); a directory of parts with it
        table = pq.ParquetFile(path).read() if path.is_file() else pq.read_table(path)
    except Exception as e:
        raise FeatXError(f"{path}: not a readable Parquet table ({e})") from None
    missing = {"path", "key", "embedding"} - set(table.column_names)
    if missing:
        raise FeatXError(f"{path}: not a featx embeddings table (missing columns {sorted(missing)})")
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None and path.is_dir():
        files = sorted(path.glob("*.parquet"))
        raw = (pq.read_schema(files[0]).metadata or {}).get(META_KEY) if files else None
    meta = json.loads(raw) if raw else {}
    labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(table)
    return EmbeddingTable(
        paths=table.column("path").to_pylist(), labels=labels,
        keys=table.column("key").to_pylist(), X=embeddings_of(table), meta=meta,
    )
