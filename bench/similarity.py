"""Neighbours and duplicates on Fashion-MNIST: train/test leakage, search time at 60k rows, recall.

Run: PYTHONPATH=$PWD .venv/bin/python bench/similarity.py [--features embedded pixels] [--k 10]
     .venv/bin/python bench/similarity.py --features table --tables TRAIN.parquet TEST.parquet \
         --columns 3600:4880    # featx tables already extracted (here: the `last` segment of multi)

All 60,000 training and 10,000 test images of Fashion-MNIST (Debian's
dataset-fashion-mnist), searched two ways in one run:
- ``embedded``: the default backbone's embeddings (efficientnet_lite0, 1280-d), computed
  through featx's cache (``featx.engines.files.embed_arrays``: the first run embeds 70k images,
  tens of minutes on 2 cores; later runs read them from the store);
- ``pixels``: the raw 784 pixel values as float32 vectors (no backbone).

For each: near-duplicates between train and test at several thresholds
(``featx.similarity.duplicates(train, across=test)``: test images with a near copy in
train, how many of those copies carry another label, how many are pixel-identical),
the 10k test images' top-k among the 60k training rows by exact search
(``featx.similarity.search``, index="exact"), by HNSW (index="approx": build + query time,
recall@k against exact on all 10k queries), and the baseline, scikit-learn's
``NearestNeighbors(metric="cosine", algorithm="brute")``, timed on the same queries.
Writes bench/results/similarity.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "similarity.json"
THRESHOLDS = (0.95, 0.97, 0.98, 0.99, 0.999)


def tables(kind: str, train_rows: int | None = None):
    """(train, test) EmbeddingTables of Fashion-MNIST; keys are pixel hashes (identical images share one).

    ``train_rows``: only the first that many training images (all test images).
    """
    from featx.datasets import FASHION_MNIST_CLASSES, fashion_mnist
    from featx.embed.table import EmbeddingTable
    from featx.engines.files import array_key

    out = []
    bb = None
    if kind == "embedded":
        from featx.backbones.resolve import resolve_backbone

        bb = resolve_backbone(None)
    for split in ("train", "test"):
        x, y = fashion_mnist(split)
        if split == "train" and train_rows:
            x, y = x[:train_rows], y[:train_rows]
        if bb is None:
            X = x.reshape(len(x), -1).astype(np.float32)
            meta = {"fingerprint": "pixels", "backbone": "raw pixels"}
        else:
            X = embed(x, bb, split)
            meta = {"fingerprint": bb.fingerprint, "backbone": bb.name}
        out.append(EmbeddingTable([f"{split}/{i:05d}" for i in range(len(x))],
                                  [FASHION_MNIST_CLASSES[v] for v in y], [array_key(a) for a in x], X, meta))
    return out


def from_tables(paths: list[Path], columns: str | None):
    """(train, test) from featx tables, optionally a slice of their embedding columns."""
    from dataclasses import replace

    from featx.embed.table import read_table

    if not paths:
        raise SystemExit("--features table needs --tables TRAIN TEST")
    out = [read_table(p) for p in paths]
    if columns:
        start, stop = (int(v) for v in columns.split(":"))
        out = [replace(t, X=np.ascontiguousarray(t.X[:, start:stop])) for t in out]
    return out


def embed(x: np.ndarray, bb, split: str) -> np.ndarray:
    from featx.engines.files import embed_arrays

    parts = []
    t = time.perf_counter()
    for s in range(0, len(x), 5000):  # in slices, to log progress; the cache key is per image
        parts.append(embed_arrays(x[s:s + 5000], bb, batch_size=64))
        logging.info("%s: %d/%d embedded or read from the cache (%.0f s)", split, s + len(parts[-1]),
                     len(x), time.perf_counter() - t)
    return np.concatenate(parts)


def leakage(train, test, k: int) -> dict:
    """Near-duplicates between the splits, once at the lowest threshold, then counted at each."""
    from featx.similarity import duplicates

    t = time.perf_counter()
    r = duplicates(train, across=test, threshold=min(THRESHOLDS), per_image=k, index="exact")
    seconds = time.perf_counter() - t
    rows = {}
    for thr in THRESHOLDS:
        keep = r.similarity >= thr
        a, b, same = r.a[keep], r.b[keep], r.identical[keep]
        nearest: dict[int, int] = {}
        for i, j in zip(a.tolist(), b.tolist(), strict=True):
            nearest.setdefault(j, i)  # pairs come most similar first
        other = sum(train.labels[i] != test.labels[j] for j, i in nearest.items())
        rows[str(thr)] = {"pairs": int(keep.sum()), "test_images_with_copy": len(nearest),
                          "other_label": int(other), "pixel_identical_pairs": int(same.sum()),
                          "test_images_pixel_identical": len(set(b[same].tolist()))}
    return {"seconds": round(seconds, 2), "by_threshold": rows}


class Clock:
    """Wall and CPU seconds between laps (the CPU time of this process: steadier on a shared machine)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> dict:
        wall, cpu = time.perf_counter(), time.process_time()
        d = {"wall": round(wall - self.wall, 2), "cpu": round(cpu - self.cpu, 2)}
        self.wall, self.cpu = wall, cpu
        return d


def timings(train, test, k: int) -> dict:
    """Exact vs HNSW vs sklearn brute force: the 10k test rows' top-k among the 60k train rows."""
    from sklearn.neighbors import NearestNeighbors

    from featx.similarity import approx_topk, hnsw_index, normalize, recall_at_k, search

    Q, X = test.X, train.X
    clock = Clock()
    ex = search(Q, X, k, index="exact")
    exact_s = clock.lap()
    Qn, Xn = normalize(Q), normalize(X)
    clock.lap()
    index = hnsw_index(Xn)
    build_s = clock.lap()
    _, ap_sim = approx_topk(index, Qn, k)
    query_s = clock.lap()
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(X)
    sk_dist, _ = nn.kneighbors(Q)
    sklearn_s = clock.lap()
    return {
        "rows": len(X), "queries": len(Q), "dim": X.shape[1], "k": k,
        "exact_s": exact_s, "approx_build_s": build_s, "approx_query_s": query_s,
        "approx_recall_at_k": round(recall_at_k(ap_sim, ex.similarity), 4),
        "sklearn_brute_cosine_s": sklearn_s,
        "sklearn_over_exact": {w: round(sklearn_s[w] / exact_s[w], 2) for w in exact_s},
        "top1_agrees_with_sklearn": round(float(np.mean(
            np.isclose(1 - sk_dist[:, 0], ex.similarity[:, 0], atol=1e-4))), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", nargs="+", choices=["embedded", "pixels", "table"],
                    default=["embedded", "pixels"])
    ap.add_argument("--tables", nargs=2, type=Path, metavar=("TRAIN", "TEST"),
                    help="table: two featx tables (e.g. bench/features.py's 60k multi tables)")
    ap.add_argument("--columns", default=None, metavar="START:STOP",
                    help="table: only these embedding columns (multi's last segment: 3600:4880)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--train-rows", type=int, default=0,
                    help="embedded: only the first N training images (0: all 60,000)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from featx.atomic import write_text
    from featx.datasets import fashion_mnist_available

    if not fashion_mnist_available():
        raise SystemExit("needs Debian's dataset-fashion-mnist")
    results = {}
    for kind in a.features:
        if kind == "table":
            train, test = from_tables(a.tables, a.columns)
        else:
            train, test = tables(kind, a.train_rows if kind == "embedded" else None)
        results[kind] = {"leakage": leakage(train, test, a.k), "search": timings(train, test, a.k)}
        print(f"\n== {kind} ({train.X.shape[1]}-d): test images with a near copy in train")
        print(f"{'cosine >=':>10} {'pairs':>7} {'test imgs':>9} {'other label':>11} {'pixel-identical':>15}")
        for thr, r in results[kind]["leakage"]["by_threshold"].items():
            print(f"{thr:>10} {r['pairs']:>7} {r['test_images_with_copy']:>9} {r['other_label']:>11} "
                  f"{r['test_images_pixel_identical']:>15}")
        s = results[kind]["search"]
        print(f"search, {s['queries']} queries x {s['rows']} rows, k={s['k']} (seconds wall / cpu):")
        for what, key in (("featx exact", "exact_s"), ("HNSW build", "approx_build_s"),
                          ("HNSW query", "approx_query_s"), ("sklearn brute cosine", "sklearn_brute_cosine_s")):
            print(f"  {what:<22} {s[key]['wall']:>8} / {s[key]['cpu']:<8}")
        print(f"  HNSW recall@{s['k']} {s['approx_recall_at_k']}; sklearn / featx exact time "
              f"{s['sklearn_over_exact']['wall']} wall, {s['sklearn_over_exact']['cpu']} cpu; "
              f"top-1 similarity agrees with sklearn on {s['top1_agrees_with_sklearn']:.2%} of queries")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    write_text(OUT, json.dumps(results, indent=2))
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
