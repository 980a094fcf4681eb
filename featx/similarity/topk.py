"""The k most similar rows of a matrix: cosine similarity of L2-normalised rows.

Exact by default: blocked matrix products (BLAS) with the top ``k`` of each block
taken by ``argpartition``, each block sized so its similarity matrix stays under
``BLOCK_BYTES``. Above ``EXACT_MAX_ROWS`` rows ``index="auto"`` builds an approximate
HNSW index (hnswlib, the ``ann`` extra) and measures its recall against exact search
on a sample of queries.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from featx.errors import FeatXError, MismatchError, require
from featx.progress import ProgressFn, no_progress

__all__ = ["BLOCK_BYTES", "EXACT_MAX_ROWS", "INDEXES", "RECALL_SAMPLE", "SearchResult", "approx_topk",
           "block_rows", "choose_index", "exact_topk", "hnsw_index", "normalize", "recall_at_k", "search"]

log = logging.getLogger(__name__)


#: largest similarity block held at once (float32 block x N), bytes
BLOCK_BYTES = 256 << 20
#: ``index="auto"`` searches exactly up to this many rows, approximately above
EXACT_MAX_ROWS = 1_000_000
#: queries of an approximate search checked against exact search for its recall
RECALL_SAMPLE = 200
INDEXES = ("auto", "exact", "approx")


def normalize(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (an all-zero row stays zero)."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, np.float32(1e-12))


@dataclass
class SearchResult:
    """Top-``k`` of each query: ``index[i, r]`` is the row of the ``r``-th nearest, ``similarity[i, r]``
    its cosine similarity (descending along ``r``).

    ``method`` is ``"exact"`` or ``"approx"``; for approx, ``recall`` is the mean
    recall@k against exact search on ``recall_queries`` sampled queries.
    """

    index: np.ndarray
    similarity: np.ndarray
    method: str
    build_s: float = 0.0
    search_s: float = 0.0
    recall: float | None = None
    recall_queries: int = 0
    note: str = ""


def block_rows(n: int, budget: int = BLOCK_BYTES) -> int:
    """Query rows per block so that a block x ``n`` float32 matrix stays under ``budget`` bytes."""
    return max(1, budget // (4 * max(n, 1)))


def exact_topk(Q: np.ndarray, X: np.ndarray, k: int, progress: ProgressFn = no_progress,
               budget: int = BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` rows of ``X`` by inner product for each row of ``Q`` (both normalised).

    Memory: one block x len(X) similarity matrix at a time (``budget`` bytes).
    Ties are broken by the lower row index, so the order does not depend on the blocking.
    """
    n = len(X)
    k = min(k, n)
    idx = np.zeros((len(Q), k), np.int64)
    sim = np.zeros((len(Q), k), np.float32)
    step = block_rows(n, budget)
    for s in range(0, len(Q), step):
        S = Q[s:s + step] @ X.T
        top = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(S), 1))
        vals = np.take_along_axis(S, top, axis=1)
        order = np.lexsort((top, -vals), axis=1)  # by similarity, then row
        idx[s:s + step] = np.take_along_axis(top, order, axis=1)
        sim[s:s + step] = np.take_along_axis(vals, order, axis=1)
        progress("search", min(s + step, len(Q)), len(Q))
    return idx, sim


def hnsw_index(X: np.ndarray, *, M: int = 16, ef_construction: int = 200, threads: int = -1,
               progress: ProgressFn = no_progress):
    """An hnswlib index (inner product) over the normalised rows of ``X``."""
    hnswlib = require("hnswlib", "ann")
    index = hnswlib.Index(space="ip", dim=X.shape[1])
    index.init_index(max_elements=max(len(X), 1), M=M, ef_construction=ef_construction, random_seed=0)
    step = 10_000
    for s in range(0, len(X), step):
        index.add_items(X[s:s + step], np.arange(s, min(s + step, len(X))), num_threads=threads)
        progress("index", min(s + step, len(X)), len(X))
    return index


def approx_topk(index, Q: np.ndarray, k: int, ef: int | None = None, threads: int = -1,
                progress: ProgressFn = no_progress) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of each query from an hnswlib index; similarity = 1 - inner-product distance."""
    k = min(k, index.get_current_count())
    index.set_ef(max(ef or 0, 2 * k, 64))  # ef < k cannot return k results
    idx = np.zeros((len(Q), k), np.int64)
    sim = np.zeros((len(Q), k), np.float32)
    step = 10_000
    for s in range(0, len(Q), step):
        labels, dist = index.knn_query(Q[s:s + step], k=k, num_threads=threads)
        idx[s:s + step] = labels
        sim[s:s + step] = 1.0 - dist
        progress("search", min(s + step, len(Q)), len(Q))
    return idx, sim


def recall_at_k(approx_sim: np.ndarray, exact_sim: np.ndarray, tol: float = 1e-5) -> float:
    """Mean share of each query's approximate top-k that is as similar as its exact k-th neighbour.

    Counted by similarity, not by row, so that equally similar rows (exact copies) found
    in another order are not counted as misses.
    """
    if exact_sim.size == 0:
        return 1.0
    kth = exact_sim[:, -1:]
    return float(np.mean(approx_sim >= kth - tol))


def choose_index(index: str, n: int) -> tuple[str, str]:
    """(``"exact"`` or ``"approx"``, a note for the user) for ``index`` over ``n`` rows."""
    if index not in INDEXES:
        raise FeatXError(f"index must be one of {', '.join(INDEXES)}, got {index!r}")
    if index == "exact":
        return "exact", ""
    if index == "approx":
        require("hnswlib", "ann")
        return "approx", ""
    if n <= EXACT_MAX_ROWS:
        return "exact", ""
    try:
        require("hnswlib", "ann")
    except FeatXError as e:
        note = (f"{n} rows: an approximate index would be faster, but hnswlib is not installed "
                f"({e}); searching exactly")
        log.warning(note)
        return "exact", note
    return "approx", f"{n} rows > {EXACT_MAX_ROWS}: approximate index (HNSW)"


def search(Q: np.ndarray, X: np.ndarray, k: int = 10, *, index: str = "auto", ef: int | None = None,
           recall_sample: int = RECALL_SAMPLE, seed: int = 0,
           progress: ProgressFn = no_progress) -> SearchResult:
    """The ``k`` rows of ``X`` most cosine-similar to each row of ``Q``.

    Parameters
    ----------
    Q, X : (nq, d) and (n, d) embeddings; normalised here (any scale is fine).
    index : ``"exact"`` (blocked BLAS), ``"approx"`` (HNSW, needs hnswlib: the ``ann``
        extra) or ``"auto"`` (exact up to ``EXACT_MAX_ROWS`` rows of ``X``).
    ef : HNSW search breadth (default ``max(2k, 64)``); higher is slower and more exact.
    recall_sample : for approx, how many queries are also searched exactly to measure recall.
    """
    if k < 1:
        raise FeatXError(f"k must be >= 1, got {k}")
    if Q.ndim != 2 or X.ndim != 2 or Q.shape[1] != X.shape[1]:
        raise MismatchError(f"embeddings of different widths: queries {Q.shape}, table {X.shape}")
    if len(X) == 0:
        raise FeatXError("the table to search has no rows")
    method, note = choose_index(index, len(X))
    Qn, Xn = normalize(Q), normalize(X)
    t0 = time.perf_counter()
    if method == "exact":
        idx, sim = exact_topk(Qn, Xn, k, progress)
        return SearchResult(idx, sim, "exact", 0.0, time.perf_counter() - t0, note=note)
    hnsw = hnsw_index(Xn, progress=progress)
    t1 = time.perf_counter()
    idx, sim = approx_topk(hnsw, Qn, k, ef, progress=progress)
    t2 = time.perf_counter()
    sample = np.sort(np.random.default_rng(seed).permutation(len(Qn))[:recall_sample])
    _, ex_sim = exact_topk(Qn[sample], Xn, k)
    recall = recall_at_k(sim[sample], ex_sim)
    log.info("approximate search: recall@%d %.4f on %d queries", idx.shape[1], recall, len(sample))
    return SearchResult(idx, sim, "approx", t1 - t0, t2 - t1, recall, len(sample), note)
