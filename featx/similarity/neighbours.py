"""``neighbors(query, table, k)``: the ``k`` images of ``table`` most like each query image
(an image file, a folder, a table of paths, or another featx table; files are embedded
with the table's own backbone through the shared cache)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from featx.atomic import result_file, write_text
from featx.embed.scan import output_path
from featx.embed.table import EmbeddingTable, image_paths
from featx.errors import FeatXError
from featx.progress import ProgressFn, no_progress
from featx.similarity.tables import (
    display_paths,
    embed_query,
    load_table,
    result_csv,
)
from featx.similarity.topk import SearchResult, search

__all__ = ["NeighborsResult", "neighbors", "write_neighbors"]


@dataclass
class NeighborsResult:
    """The ``k`` nearest table images of each query image.

    ``index[i, r]`` is the table row of query ``i``'s ``r``-th neighbour and
    ``similarity[i, r]`` its cosine similarity; ``paths``/``labels`` are the table's
    rows (files under the table's data root).
    """

    query_files: list[str]
    query_labels: list[str | None]
    paths: list[str]
    labels: list[str | None]
    search: SearchResult
    failures: list[tuple[str, str]] = field(default_factory=list)
    table: str = ""

    @property
    def k(self) -> int:
        return int(self.search.index.shape[1])

    def rows(self) -> list[dict]:
        """One dict per (query, rank): query, query_label, rank (1 = nearest), path, label, similarity."""
        out = []
        for i, q in enumerate(self.query_files):
            for r in range(self.k):
                j = int(self.search.index[i, r])
                out.append({"query": q, "query_label": self.query_labels[i], "rank": r + 1,
                            "path": self.paths[j], "label": self.labels[j],
                            "similarity": float(self.search.similarity[i, r])})
        return out

    def summary(self) -> dict:
        s = self.search
        return {"table": self.table, "queries": len(self.query_files), "rows": len(self.paths),
                "k": self.k, "index": s.method, "recall": s.recall, "recall_queries": s.recall_queries,
                "build_s": round(s.build_s, 3), "search_s": round(s.search_s, 3), "note": s.note,
                "failures": len(self.failures)}


def neighbors(query, table: str | os.PathLike | EmbeddingTable, k: int = 10, *,
              index: str = "auto", backbone=None, device: str = "auto",
              store: str | os.PathLike | None = None, batch_size: int = 32,
              workers: int | None = None, ef: int | None = None,
              progress: ProgressFn = no_progress) -> NeighborsResult:
    """The ``k`` images of ``table`` nearest (cosine) to each query image.

    Parameters
    ----------
    query : an image file, a folder (recursively), a CSV/TSV/Parquet listing of paths, a list
        of those, or a featx embeddings table (``featx extract`` output, or an
        ``EmbeddingTable``). Files are embedded with the backbone that made ``table``
        (cached in the store like ``featx extract``); a query table must come from that
        same backbone, else ``MismatchError``.
    table : a featx embeddings table (path or ``EmbeddingTable``).
    index : ``"auto"``, ``"exact"`` or ``"approx"``; see ``search``.
    backbone : the backbone that made ``table`` when its recorded export is gone; another
        backbone is refused (its fingerprint differs).

    Returns
    -------
    NeighborsResult
        Unreadable query files are listed in ``failures`` with their reason.
    """
    t, t_name = load_table(table)
    q = embed_query(query, t, t_name, backbone=backbone, device=device, store=store,
                    batch_size=batch_size, workers=workers, progress=progress)
    if len(q.X) == 0:
        raise FeatXError(f"none of the query images could be read: {q.failures[:3]}")
    res = search(q.X, t.X, k, index=index, ef=ef, progress=progress)
    return NeighborsResult(q.files, q.labels, image_paths(t, table), list(t.labels),
                           res, q.failures, t_name)


def write_neighbors(result: NeighborsResult, out: str | os.PathLike) -> Path:
    """CSV/TSV (one row per query and rank) or JSON (summary, rows, failures), by suffix; atomic."""
    out, suffix = result_file(out)
    rows = display_paths(result.rows(), ("query", "path", "query_label", "label"))
    if suffix == ".json":
        doc = {**result.summary(), "neighbors": rows,
               "failures": [{"path": output_path(p), "reason": r} for p, r in result.failures]}
        return write_text(out, json.dumps(doc, indent=2))
    cols = ("query", "query_label", "rank", "path", "label", "similarity")
    return write_text(out, result_csv(rows, cols, suffix == ".tsv"))
