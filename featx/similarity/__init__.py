"""Neighbours and near-duplicates over embedding tables: cosine similarity of L2-normalised rows.

``topk`` (the k most similar rows of a matrix: exact blocked BLAS or HNSW), ``tables``
(tables read and checked, query images embedded, results as CSV), ``neighbours``
(``neighbors``, ``write_neighbors``) and ``near_duplicates`` (``duplicates``,
``write_duplicates``, clusters, train/test leakage). Every public name is importable
from ``featx.similarity`` itself (lazily: importing the package runs no module).
"""

from __future__ import annotations

from featx._lazy import lazy_exports

_EXPORTS = {
    "BLOCK_BYTES": "featx.similarity.topk",
    "DEFAULT_THRESHOLD": "featx.similarity.near_duplicates",
    "DuplicatesResult": "featx.similarity.near_duplicates",
    "EXACT_MAX_ROWS": "featx.similarity.topk",
    "INDEXES": "featx.similarity.topk",
    "NeighborsResult": "featx.similarity.neighbours",
    "Query": "featx.similarity.tables",
    "RECALL_SAMPLE": "featx.similarity.topk",
    "SearchResult": "featx.similarity.topk",
    "approx_topk": "featx.similarity.topk",
    "block_rows": "featx.similarity.topk",
    "check_same_backbone": "featx.similarity.tables",
    "choose_index": "featx.similarity.topk",
    "clusters": "featx.similarity.near_duplicates",
    "display_paths": "featx.similarity.tables",
    "duplicates": "featx.similarity.near_duplicates",
    "embed_query": "featx.similarity.tables",
    "exact_topk": "featx.similarity.topk",
    "hnsw_index": "featx.similarity.topk",
    "is_embeddings_table": "featx.similarity.tables",
    "load_table": "featx.similarity.tables",
    "neighbors": "featx.similarity.neighbours",
    "normalize": "featx.similarity.topk",
    "recall_at_k": "featx.similarity.topk",
    "result_csv": "featx.similarity.tables",
    "search": "featx.similarity.topk",
    "write_duplicates": "featx.similarity.near_duplicates",
    "write_neighbors": "featx.similarity.neighbours",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
