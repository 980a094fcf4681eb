"""The ``--out`` table: one row per image (path, label, key, embedding) + featx metadata.

Plain Parquet, readable by pandas/pyarrow without featx; the backbone
fingerprint and data root travel in the schema metadata.

Columns: ``path`` (relative to the data root, ``/``-separated, UTF-8 text),
``label`` (text, null when unlabelled), ``key`` (content hash), ``embedding``
(fixed-size list of float32). A file name that is not valid UTF-8 cannot be
Parquet text as it is: its ``path`` holds the printable form, with each byte
that is not UTF-8 written as ``\\xNN`` (``featx.embed.scan.display_path``), and
the table gains a ``path_bytes`` column (binary) with the name's exact bytes for
those rows (null for the others). ``read_table`` gives the exact names back
(``os.fsdecode`` of the bytes); tables of valid UTF-8 names have no such column.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featx.atomic import atomic_path
from featx.embed import arrow
from featx.embed.scan import (
    check_listing_types,
    display_path,
    is_table_file,
    is_utf8,
    resolve_item_path,
)
from featx.embed.store import embeddings_of, read_embeddings
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


def image_root(t: EmbeddingTable, table: str | os.PathLike | EmbeddingTable | None = None) -> str | None:
    """The folder a table's relative ``path`` values start from: the data root it records (a
    listing file, CSV/Parquet, stands for its folder); a table that records none (written by
    hand) starts from its own file's folder; an in-memory one (``table`` not a path) from
    nowhere (its paths are used as they are)."""
    root = t.meta.get("root")
    if root:
        return str(Path(root).parent) if is_table_file(root) else str(root)
    if isinstance(table, (str, os.PathLike)):
        return str(Path(table).parent)
    return None


def image_paths(t: EmbeddingTable, table: str | os.PathLike | EmbeddingTable | None = None,
                paths: Iterable[str] | None = None) -> list[str]:
    """Where each row's image is on disk (``paths``: some of ``t.paths``; all of them by
    default); ``table`` is what the table was read from (see ``image_root``). The one rule for
    every job that opens a table's images (neighbours, duplicates, audit, plot, suggest)."""
    root = image_root(t, table)
    rows = t.paths if paths is None else paths
    return list(rows) if root is None else [resolve_item_path(root, p) for p in rows]


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
    raw = [None if is_utf8(p) else os.fsencode(p) for p in t.paths]
    fields = [("path", pa.string()), ("label", pa.string()), ("key", pa.string()),
              ("embedding", arrow.embedding_type(dim))]
    if any(b is not None for b in raw):
        fields.append(("path_bytes", pa.binary()))
    schema = pa.schema(fields, metadata={META_KEY: json.dumps(t.meta).encode()})
    try:
        # a dictionary for the labels only: paths, keys and embeddings are unique values
        with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, use_dictionary=["label"]) as w:
            start = 0
            for emb in chunks:
                end = start + len(emb)
                w.write_table(_rows(t, raw, start, end, emb, schema))
                start = end
    except OSError as e:
        raise FeatXError(f"cannot write the table {path}: {e.strerror or e}. The embeddings are in "
                         "the store; fix this and run the same command again (nothing is recomputed).") from None
    return path


def _rows(t: EmbeddingTable, raw: list[bytes | None], start: int, end: int, emb: np.ndarray,
          schema: pa.Schema) -> pa.Table:
    """Rows ``start:end`` of ``t`` with their embeddings ``emb``, as an Arrow table of ``schema``."""
    dim = schema.field("embedding").type.list_size
    cols = [arrow.strings([display_path(p) for p in t.paths[start:end]]),
            arrow.strings([None if lbl is None else display_path(lbl) for lbl in t.labels[start:end]]),
            arrow.strings(t.keys[start:end]),
            arrow.embeddings(np.asarray(emb, np.float32).reshape(-1, dim))]
    if "path_bytes" in schema.names:
        cols.append(arrow.strings(raw[start:end], binary=True))
    return pa.Table.from_arrays(cols, schema=schema)


def check_table_overwrite(out: str | os.PathLike, force: bool = False) -> None:
    """Refuse to replace ``out`` when it exists and is not a featx table, unless ``force``:
    ``--out photo.png`` by mistake must not destroy the photo."""
    out = Path(out)
    if force or not out.exists():
        return
    if out.is_dir():
        raise FeatXError(f"{out} is a folder; --out names the table file to write (e.g. train.featx.parquet)")
    try:
        schema = pq.read_schema(out)
        ours = "embedding" in schema.names and META_KEY in (schema.metadata or {})
    except Exception:  # not Parquet at all
        ours = False
    if not ours:
        raise FeatXError(f"{out} already exists and is not a featx embeddings table; pass --force to "
                         "replace it, or choose another --out")


#: metadata fields that are text when present (others are left to their readers)
TEXT_FIELDS = ("fingerprint", "backbone", "backbone_path", "root")


def parse_meta(raw: bytes | None, where: str | os.PathLike) -> dict:
    """A table's featx metadata (the schema's ``featx`` entry) as a dict; {} when absent.

    Metadata that is not a JSON object, or whose backbone/root fields are not text, is
    refused with one line naming ``where``: it was damaged or edited by hand, and none of
    it can be trusted to say which backbone made the embeddings.
    """
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise FeatXError(f"{where}: the table's featx metadata is damaged (not a JSON object); "
                         "extract the images again to rebuild it")
    bad = [k for k in TEXT_FIELDS if meta.get(k) is not None and not isinstance(meta[k], str)]
    if bad:
        raise FeatXError(f"{where}: the table's featx metadata is damaged ({', '.join(bad)} not text); "
                         "extract the images again to rebuild it")
    return meta


def read_table(path: str | os.PathLike) -> EmbeddingTable:
    """Read a table written by ``featx extract`` (a file, or a directory of such files)."""
    path = Path(path)
    if not path.exists():
        raise FeatXError(f"{path}: no such embeddings table; run `featx extract` first")
    try:
        # a single file without pyarrow.dataset (slow to import), its embeddings a row group at a
        # time (read_embeddings); a directory of parts with pyarrow.dataset
        if path.is_file():
            f = pq.ParquetFile(path)
            names = f.schema_arrow.names
            table = f.read(columns=[c for c in names if c != "embedding"])
            X = read_embeddings(f, path) if "embedding" in names else None
        else:
            table = pq.read_table(path)
            names = table.column_names
            X = embeddings_of(table) if "embedding" in names else None
    except FeatXError:
        raise
    except Exception as e:
        raise FeatXError(f"{path}: not a readable Parquet table ({e})") from None
    missing = {"path", "key", "embedding"} - set(names)
    if missing:
        raise FeatXError(f"{path}: not a featx embeddings table (missing columns {sorted(missing)})")
    check_listing_types(path, table.schema)
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None and path.is_dir():
        files = sorted(path.glob("*.parquet"))
        raw = (pq.read_schema(files[0]).metadata or {}).get(META_KEY) if files else None
    meta = parse_meta(raw, path)
    labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(table)
    paths = table.column("path").to_pylist()
    if "path_bytes" in table.column_names:  # names that are not UTF-8: their exact bytes
        paths = [p if b is None else os.fsdecode(b) for p, b in zip(paths, table.column("path_bytes").to_pylist(),
                                                                     strict=True)]
    return EmbeddingTable(
        paths=paths, labels=labels,
        keys=table.column("key").to_pylist(), X=X, meta=meta,
    )
