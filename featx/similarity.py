"""Neighbours and near-duplicates over embedding tables: cosine similarity of L2-normalised rows.

``neighbors(query, table, k)``: the ``k`` images of ``table`` most like each query
image (an image file, a folder, a table of paths, or another featx table; files are
embedded with the table's own backbone through the shared cache).
``duplicates(table, across=None)``: pairs of images whose similarity is at least
``threshold``, within one table, or between two (``across``: train/test leakage),
grouped into clusters; byte-identical files (same content key) are marked.

Search is exact by default: blocked matrix products (BLAS) with the top ``k`` of
each block taken by ``argpartition``, each block sized so its similarity matrix
stays under ``BLOCK_BYTES``. Above ``EXACT_MAX_ROWS`` rows ``index="auto"`` builds
an approximate HNSW index (hnswlib, the ``ann`` extra) and measures its recall
against exact search on a sample of queries.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.atomic import result_file, write_text
from featx.backbones.resolve import table_backbone
from featx.csvout import csv_writer
from featx.embed.scan import display_path, is_table_file, output_path, resolve_item_path
from featx.embed.table import EmbeddingTable, read_table
from featx.embed.table_checks import require_fingerprint, require_finite, require_same_backbone
from featx.engines.files import collect_files, embed_paths
from featx.errors import FeatXError, MismatchError, require
from featx.progress import ProgressFn, no_progress

__all__ = ["DEFAULT_THRESHOLD", "DuplicatesResult", "NeighborsResult", "SearchResult",
           "duplicates", "neighbors", "search", "write_duplicates", "write_neighbors"]

log = logging.getLogger(__name__)

#: largest similarity block held at once (float32 block x N), bytes
BLOCK_BYTES = 256 << 20
#: ``index="auto"`` searches exactly up to this many rows, approximately above
EXACT_MAX_ROWS = 1_000_000
#: queries of an approximate search checked against exact search for its recall
RECALL_SAMPLE = 200
#: the default near-duplicate threshold (cosine); see docs/similarity.md for what was measured
DEFAULT_THRESHOLD = 0.95
INDEXES = ("auto", "exact", "approx")


# ---- search on matrices ----------------------------------------------------------------------

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


# ---- tables and queries ----------------------------------------------------------------------

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


def full_path(t: EmbeddingTable, p: str) -> str:
    """A table row's file: its path under the table's recorded data root."""
    root = t.meta.get("root")
    return p if not root else resolve_item_path(root, p)


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
        return Query([full_path(q, p) for p in q.paths], list(q.labels), q.X, keys=list(q.keys))
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



# ---- neighbours ------------------------------------------------------------------------------

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
    return NeighborsResult(q.files, q.labels, [full_path(t, p) for p in t.paths], list(t.labels),
                           res, q.failures, t_name)


def _csv(rows: list[dict], columns: Sequence[str], tsv: bool) -> str:
    buf = io.StringIO(newline="")
    w = csv_writer(buf, delimiter="\t" if tsv else ",")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r[c] is None else f"{r[c]:.6f}" if isinstance(r[c], float) else r[c]
                    for c in columns])
    return buf.getvalue()


def _printable(rows: list[dict], keys: Sequence[str]) -> list[dict]:
    # path columns absolute (featx.embed.scan.output_path: the one rule of every output)
    return [{**r, **{c: (output_path if c in PATH_COLUMNS else display_path)(r[c]) for c in keys
                     if r[c] is not None}} for r in rows]


PATH_COLUMNS = frozenset({"query", "path", "path_a", "path_b"})


def write_neighbors(result: NeighborsResult, out: str | os.PathLike) -> Path:
    """CSV/TSV (one row per query and rank) or JSON (summary, rows, failures), by suffix; atomic."""
    out, suffix = result_file(out)
    rows = _printable(result.rows(), ("query", "path", "query_label", "label"))
    if suffix == ".json":
        doc = {**result.summary(), "neighbors": rows,
               "failures": [{"path": output_path(p), "reason": r} for p, r in result.failures]}
        return write_text(out, json.dumps(doc, indent=2))
    cols = ("query", "query_label", "rank", "path", "label", "similarity")
    return write_text(out, _csv(rows, cols, suffix == ".tsv"))


# ---- duplicates ------------------------------------------------------------------------------

@dataclass
class DuplicatesResult:
    """Near-duplicate pairs (cosine >= ``threshold``), within ``table`` or between it and ``across``.

    Pair ``p`` joins row ``a[p]`` of the table with row ``b[p]`` of the table (within) or of
    ``across``; ``identical[p]`` when both files have the same bytes (same content key).
    ``clusters`` are the connected components of the pairs, largest first: lists of
    ``(side, row)`` with side ``"table"`` or ``"across"``.
    Across: ``leaked`` counts the ``across`` images with a near copy in the table,
    ``leaked_other_label`` those whose most similar copy carries another label.
    ``capped`` counts images whose ``per_image`` nearest were all above the threshold:
    they may have more copies than listed (raise ``per_image`` to see them).
    """

    a: np.ndarray
    b: np.ndarray
    similarity: np.ndarray
    identical: np.ndarray
    paths: list[str]
    labels: list[str | None]
    across_paths: list[str] | None
    across_labels: list[str | None] | None
    threshold: float
    search: SearchResult
    clusters: list[list[tuple[str, int]]] = field(default_factory=list)
    leaked: int = 0
    leaked_other_label: int = 0
    capped: int = 0
    table: str = ""
    across: str | None = None
    calibration: object | None = None  # featx.copy_threshold.ThresholdChoice for threshold="auto"

    def __len__(self) -> int:
        return len(self.a)

    def _side(self, side: str) -> tuple[list[str], list[str | None]]:
        if side == "across" and self.across_paths is not None:
            return self.across_paths, self.across_labels  # type: ignore[return-value]
        return self.paths, self.labels

    def rows(self) -> list[dict]:
        """One dict per pair, most similar first: path_a, label_a, path_b, label_b, similarity,
        identical (same bytes), cluster (its index in ``clusters``)."""
        cluster_of = {m: c for c, members in enumerate(self.clusters) for m in members}
        pb, lb = self._side("across")
        out = []
        for a, b, s, same in zip(self.a, self.b, self.similarity, self.identical, strict=True):
            out.append({"path_a": self.paths[a], "label_a": self.labels[a], "path_b": pb[b],
                        "label_b": lb[b], "similarity": float(s), "identical": bool(same),
                        "cluster": cluster_of.get(("table", int(a)))})
        return out

    def cluster_rows(self) -> list[list[dict]]:
        """Each cluster's members: path, label, and side (``table`` or ``across``)."""
        return [[{"path": self._side(s)[0][r], "label": self._side(s)[1][r], "side": s} for s, r in c]
                for c in self.clusters]

    def summary(self) -> dict:
        s = self.search
        d = {"table": self.table, "across": self.across, "rows": len(self.paths),
             "threshold": self.threshold, "pairs": len(self), "identical_pairs": int(self.identical.sum()),
             "clusters": len(self.clusters), "largest_cluster": max(map(len, self.clusters), default=0),
             "capped": self.capped, "index": s.method, "recall": s.recall,
             "recall_queries": s.recall_queries, "build_s": round(s.build_s, 3),
             "search_s": round(s.search_s, 3), "note": s.note}
        if self.across_paths is not None:
            d.update(across_rows=len(self.across_paths), leaked=self.leaked,
                     leaked_other_label=self.leaked_other_label)
        if self.calibration is not None:
            d["calibration"] = self.calibration.summary()
        return d


def duplicates(table: str | os.PathLike | EmbeddingTable,
               across: str | os.PathLike | EmbeddingTable | None = None,
               threshold: float | str = DEFAULT_THRESHOLD, *, index: str = "auto", per_image: int = 20,
               ef: int | None = None, backbone=None, store: str | os.PathLike | None = None,
               device: str = "auto", searched: SearchResult | None = None,
               progress: ProgressFn = no_progress) -> DuplicatesResult:
    """Near-duplicate images: pairs with cosine similarity >= ``threshold``.

    Parameters
    ----------
    table : a featx embeddings table (path or ``EmbeddingTable``), e.g. the training set.
    across : another table of the same backbone (e.g. the test set): then only pairs
        between the two are reported, and ``leaked`` counts its images with a near copy
        in ``table`` (train/test leakage). Refused (``MismatchError``) when the two
        come from different backbones.
    threshold : cosine similarity in [-1, 1]; 1.0 is the same embedding (identical
        pixels after preprocessing). What lower values catch is measured in
        docs/similarity.md (re-encoded, resized and flipped copies). ``"auto"``
        calibrates it on ``table``'s own images (``featx.copy_threshold``: altered
        copies embedded with ``backbone``, default the table's, through ``store``);
        the choice is in the result's ``calibration``.
    searched : the search of ``table`` against itself with at least ``per_image + 1``
        neighbours, when the caller already ran it (within one table only).
    per_image : the most near copies listed per image (the search's ``k``).
    index : ``"auto"``, ``"exact"`` or ``"approx"``; see ``search``.

    Byte-identical files (same content key) are always paired, whatever their number.
    """
    if threshold != "auto" and not (isinstance(threshold, (int, float)) and -1.0 <= threshold <= 1.0):
        raise FeatXError(f"threshold is a cosine similarity, between -1 and 1, or 'auto'; got {threshold!r}")
    if per_image < 1:
        raise FeatXError(f"per_image must be >= 1, got {per_image}")
    t, t_name = load_table(table)
    u, u_name = (t, None) if across is None else load_table(across)
    if across is not None:
        check_same_backbone(t, t_name, u, u_name)  # type: ignore[arg-type]
    within = across is None
    calibration = None
    if threshold == "auto":
        from featx.copy_threshold import calibrate_threshold

        calibration = calibrate_threshold(t, name=t_name, backbone=backbone, store=store, device=device,
                                          progress=progress)
        threshold = calibration.threshold
    if within and searched is not None and searched.index.shape[1] >= min(per_image + 1, len(t)):
        res = searched
    else:
        res = search(u.X, t.X, per_image + within, index=index, ef=ef, progress=progress)
    pairs = _pairs(res, threshold, within)
    pairs.update(_key_pairs(t.keys, u.keys, within, pairs))
    a, b, sim = _sorted_pairs(pairs)
    same = np.array([t.keys[i] == u.keys[j] for i, j in zip(a, b, strict=True)], bool)
    capped = int(np.sum(res.similarity[:, -1] >= threshold)) if res.similarity.shape[1] else 0
    result = DuplicatesResult(a, b, sim, same, [full_path(t, p) for p in t.paths], list(t.labels),
                              None if within else [full_path(u, p) for p in u.paths],
                              None if within else list(u.labels), threshold, res,
                              clusters(a, b, len(t), None if within else len(u)), capped=capped,
                              table=t_name, across=u_name, calibration=calibration)
    if not within:
        result.leaked, result.leaked_other_label = _leakage(a, b, t.labels, u.labels)
    return result


def _pairs(res: SearchResult, threshold: float, within: bool) -> dict[tuple[int, int], float]:
    """{(table row, query row): similarity} of the search hits at or above ``threshold``.

    Within one table a pair is kept once, as (lower row, higher row), and self-hits are dropped.
    """
    q, r = np.nonzero(res.similarity >= threshold)
    hits = res.index[q, r]
    sims = np.minimum(res.similarity[q, r], 1.0)  # rounding puts identical vectors at 1 + 1e-7
    out: dict[tuple[int, int], float] = {}
    for qi, ti, s in zip(q.tolist(), hits.tolist(), sims.tolist(), strict=True):
        if within:
            if qi == ti:
                continue
            ti, qi = min(ti, qi), max(ti, qi)
        out[(ti, qi)] = max(out.get((ti, qi), -2.0), s)
    return out


def _key_pairs(t_keys: list[str], u_keys: list[str], within: bool,
               have: dict[tuple[int, int], float]) -> dict[tuple[int, int], float]:
    """Pairs of byte-identical files (same content key) the search left out (beyond ``per_image``).

    Each file is paired with the first table row of its key (a star, not every pair),
    which is enough to put them all in one cluster.
    """
    first: dict[str, int] = {}
    for i, key in enumerate(t_keys):
        first.setdefault(key, i)
    out = {}
    for j, key in enumerate(u_keys):
        i = first.get(key)
        if i is None or (within and i == j):
            continue
        if (i, j) not in have:
            out[(i, j)] = 1.0
    return out


def _sorted_pairs(pairs: dict[tuple[int, int], float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, similarity) arrays, most similar first, then by rows."""
    items = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
    a = np.array([p[0] for p, _ in items], np.int64)
    b = np.array([p[1] for p, _ in items], np.int64)
    return a, b, np.array([s for _, s in items], np.float32)


def clusters(a: np.ndarray, b: np.ndarray, n: int, n_across: int | None) -> list[list[tuple[str, int]]]:
    """Connected components (of two or more images) of the pair graph, largest first.

    Nodes are the table's rows, then (across) the other table's rows.
    """
    if len(a) == 0:
        return []
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    total = n + (n_across or 0)
    bb = b if n_across is None else b + n
    g = coo_matrix((np.ones(len(a), np.int8), (a, bb)), shape=(total, total))
    _, comp = connected_components(g, directed=False)
    members: dict[int, list[int]] = {}
    for node in np.unique(np.concatenate([a, bb])).tolist():
        members.setdefault(int(comp[node]), []).append(node)
    groups = sorted(members.values(), key=lambda m: (-len(m), m[0]))
    return [[("table", v) if v < n else ("across", v - n) for v in m] for m in groups]


def _leakage(a: np.ndarray, b: np.ndarray, labels: list[str | None],
             across_labels: list[str | None]) -> tuple[int, int]:
    """(across rows with a near copy in the table, those whose most similar copy has another label).

    Pairs come most similar first, so the first pair of each across row is its nearest copy.
    """
    nearest: dict[int, int] = {}
    for i, j in zip(a.tolist(), b.tolist(), strict=True):
        nearest.setdefault(j, i)
    other = sum(1 for j, i in nearest.items()
                if labels[i] is not None and across_labels[j] is not None and labels[i] != across_labels[j])
    return len(nearest), other


def write_duplicates(result: DuplicatesResult, out: str | os.PathLike) -> Path:
    """CSV/TSV (one row per pair) or JSON (summary, ``duplicates``: the pairs, ``groups``: the
    clusters' members), by suffix; atomic."""
    out, suffix = result_file(out)
    rows = _printable(result.rows(), ("path_a", "path_b", "label_a", "label_b"))
    if suffix == ".json":
        groups = [_printable(c, ("path", "label")) for c in result.cluster_rows()]
        # the summary's "pairs" and "clusters" are counts; the lists are "duplicates" and "groups"
        doc = {**result.summary(), "duplicates": rows, "groups": groups}
        return write_text(out, json.dumps(doc, indent=2))
    cols = ("path_a", "label_a", "path_b", "label_b", "similarity", "identical", "cluster")
    return write_text(out, _csv(rows, cols, suffix == ".tsv"))
