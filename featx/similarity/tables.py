"""The tables searched and the queries: a table read and checked, query images embedded
with the table's own backbone (through the shared cache), results written as CSV."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.backbones.resolve import table_backbone
from featx.csvout import csv_writer
from featx.embed.scan import display_path, is_table_file, output_path
from featx.embed.table import EmbeddingTable, image_paths, read_table
from featx.embed.table_checks import require_fingerprint, require_finite, require_same_backbone
from featx.engines.files import collect_files, embed_paths
from featx.errors import FeatXError
from featx.progress import ProgressFn

__all__ = ["Query", "check_same_backbone", "display_paths", "embed_query", "is_embeddings_table",
           "load_table", "result_csv"]


def load_table(table: str | os.PathLike | EmbeddingTable) -> tuple[EmbeddingTable, str]:
    """(table with its embeddings, a name for messages)."""
    if isinstance(table, EmbeddingTable):
        t, name = table, "the table"
    else:
        t, name = read_table(table), str(table)
    if t.X is None:
        raise FeatXError(f"{name}: the table holds no embeddings in memory; read it with read_table")
    require_finite(t, name)
    return t, name


def is_embeddings_table(path: str | os.PathLike) -> bool:
    """True for a Parquet file (or folder of parts) with an ``embedding`` column: a featx table."""
    p = Path(path)
    if p.is_dir():
        parts = sorted(p.glob("*.parquet"))
        if not parts or any(q.is_dir() for q in p.iterdir() if not q.name.startswith(".")):
            return False
        p = parts[0]
    if not (is_table_file(p) and p.suffix.lower() in (".parquet", ".pq")):
        return False
    import pyarrow.parquet as pq

    try:
        return "embedding" in pq.read_schema(p).names
    except Exception:  # not Parquet after all: let the path listing reader say why
        return False


def check_same_backbone(a: EmbeddingTable, a_name: str, b: EmbeddingTable, b_name: str) -> None:
    """Refuse to compare embeddings of two backbones (see ``featx.embed.table_checks``)."""
    require_same_backbone(a, a_name, b, b_name)


@dataclass
class Query:
    """The query images: their files (as given), true labels where known, embeddings, failures."""

    files: list[str]
    labels: list[str | None]
    X: np.ndarray
    failures: list[tuple[str, str]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)


def embed_query(query, t: EmbeddingTable, t_name: str, *, backbone, device: str, store,
                batch_size: int, workers: int | None, progress: ProgressFn) -> Query:
    """Embeddings of ``query`` in the space of ``t``: read from a featx table, or files embedded
    with ``t``'s backbone (through the shared cache)."""
    if isinstance(query, (list, tuple)) and len(query) == 1:
        query = query[0]
    if isinstance(query, (list, tuple)) and any(isinstance(x, EmbeddingTable) or is_embeddings_table(x)
                                                for x in query):
        raise FeatXError("a featx table is searched on its own: give one table, or image files and folders")
    if isinstance(query, EmbeddingTable) or (isinstance(query, (str, os.PathLike))
                                             and is_embeddings_table(query)):
        q, q_name = load_table(query)
        check_same_backbone(t, t_name, q, q_name)
        if backbone is not None:  # refused by table_backbone when it is not the table's
            table_backbone(t.meta, Path(t_name), backbone)
        return Query(image_paths(q, query), list(q.labels), q.X, keys=list(q.keys))
    inputs = list(query) if isinstance(query, (list, tuple)) else [query]
    require_fingerprint(t, t_name)  # files are embedded with its backbone: it must be known
    bb = table_backbone(t.meta, Path(t_name), backbone)
    files, truth, skipped = collect_files(inputs)
    if not files:
        raise FeatXError(f"no images found in {', '.join(map(str, inputs))}")
    single_dir = inputs[0] if len(inputs) == 1 and Path(inputs[0]).is_dir() else None
    X, ok, failures = embed_paths(files, bb, device=device, store=store, batch_size=batch_size,
                                  workers=workers, data_root=single_dir, progress=progress)
    return Query([files[i] for i in ok], [truth[i] for i in ok], X, skipped + failures)



def result_csv(rows: list[dict], columns: Sequence[str], tsv: bool) -> str:
    buf = io.StringIO(newline="")
    w = csv_writer(buf, delimiter="\t" if tsv else ",")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r[c] is None else f"{r[c]:.6f}" if isinstance(r[c], float) else r[c]
                    for c in columns])
    return buf.getvalue()


def display_paths(rows: list[dict], keys: Sequence[str]) -> list[dict]:
    # path columns absolute (featx.embed.scan.output_path: the one rule of every output)
    return [{**r, **{c: (output_path if c in PATH_COLUMNS else display_path)(r[c]) for c in keys
                     if r[c] is not None}} for r in rows]


PATH_COLUMNS = frozenset({"query", "path", "path_a", "path_b"})
