"""``duplicates(table, across=None)``: pairs of images whose similarity is at least
``threshold``, within one table, or between two (``across``: train/test leakage),
grouped into clusters; byte-identical files (same content key) are marked."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.atomic import result_file, write_text
from featx.embed.table import EmbeddingTable, image_paths
from featx.errors import FeatXError
from featx.progress import ProgressFn, no_progress
from featx.similarity.tables import (
    check_same_backbone,
    display_paths,
    load_table,
    result_csv,
)
from featx.similarity.topk import SearchResult, search

__all__ = ["DEFAULT_THRESHOLD", "DuplicatesResult", "clusters", "duplicates",
           "write_duplicates"]


#: the default near-duplicate threshold (cosine); see docs/similarity.md for what was measured
DEFAULT_THRESHOLD = 0.95


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
    result = DuplicatesResult(a, b, sim, same, image_paths(t, table), list(t.labels),
                              None if within else image_paths(u, across),
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
    rows = display_paths(result.rows(), ("path_a", "path_b", "label_a", "label_b"))
    if suffix == ".json":
        groups = [display_paths(c, ("path", "label")) for c in result.cluster_rows()]
        # the summary's "pairs" and "clusters" are counts; the lists are "duplicates" and "groups"
        doc = {**result.summary(), "duplicates": rows, "groups": groups}
        return write_text(out, json.dumps(doc, indent=2))
    cols = ("path_a", "label_a", "path_b", "label_b", "similarity", "identical", "cluster")
    return write_text(out, result_csv(rows, cols, suffix == ".tsv"))
