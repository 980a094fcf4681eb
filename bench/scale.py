"""How featx's costs grow with the number of images, without running a model.

A synthetic data set in featx's real formats: N small files in an ImageFolder
(``<class>/<i>.png``; their bytes are unique, not images), their real content keys,
a store namespace of a synthetic backbone holding a random float32 embedding per key
(checksummed shards, as ``ShardWriter`` writes them), and the stat cache a previous
run would have left. On that, the real code paths:

    python bench/scale.py make --rows 100000 --dim 1280 DIR     # build the set (once)
    python bench/scale.py rerun DIR                             # a fully cached `featx extract`
    python bench/scale.py cache DIR                             # open / info / verify / prune
    python bench/scale.py curve --sizes 10000 100000 1000000    # make + rerun + cache per N, JSON
    python bench/scale.py head --rows 1000000 --dim 1280        # streamed head: time and peak RSS
    python bench/scale.py head-accuracy TRAIN.parquet TEST.parquet  # streamed vs in-memory head
    python bench/scale.py search --rows 1000000 --dim 128       # exact vs HNSW: time, recall@10

Each measurement runs in a child process of its own, so its peak RSS
(``ru_maxrss``) is that of the path measured, not of the bench. Every figure is
wall time on whatever machine runs it, shared or not: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLASSES = 10
DEFAULT_BASE = Path(os.environ.get("FEATX_SCALE_DIR", "/tmp/featx-scale"))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_backbone(dim: int, base: Path):
    """A Backbone record with no model behind it: a run where everything is cached never opens it."""
    from featx.backbones.artifact import Backbone, Sidecar
    from featx.backbones.cards import Preprocess

    fp = f"synthetic{dim:07d}"
    return Backbone(base / "no-model" / "model.onnx",
                    Sidecar(name=f"synthetic-{dim}", dim=dim, preprocess=Preprocess(), fingerprint=fp))


# ---------------------------------------------------------------- make

def make(base: Path, rows: int, dim: int, shard_size: int = 2048, seed: int = 0) -> dict:
    """Write the folder, the store and the stat cache of a set of ``rows`` images."""
    from featx.embed.images import content_key
    from featx.embed.statcache import StatCache, stat_of
    from featx.embed.store import EmbeddingStore, ShardWriter

    t0 = time.perf_counter()
    data, store_root = base / "data", base / "store"
    if base.exists():
        shutil.rmtree(base)
    bb = synthetic_backbone(dim, base)
    store = EmbeddingStore(bb, store_root)
    rng = np.random.default_rng(seed)
    records = {}
    per_class = -(-rows // CLASSES)
    with ShardWriter(store, shard_size, flush_seconds=1e9) as writer:
        for c in range(CLASSES):
            folder = data / f"class{c:02d}"
            folder.mkdir(parents=True)
            lo, hi = c * per_class, min(rows, (c + 1) * per_class)
            for start in range(lo, hi, shard_size):
                end = min(hi, start + shard_size)
                keys = []
                for i in range(start, end):
                    p = str(folder / f"{i:08d}.png")
                    body = b"featx-scale %d %d\n" % (seed, i)
                    with open(p, "wb") as f:
                        f.write(body)
                    k = content_key(body)
                    keys.append(k)
                    records[p] = (stat_of(p), k)
                # the class shifts the mean, so a head has something to learn
                emb = rng.standard_normal((len(keys), dim), dtype=np.float32)
                emb[:, c] += 3.0
                writer.add(keys, emb)
    StatCache(store_root, data).save(records)
    return {"rows": rows, "dim": dim, "shards": writer.shards_written, "seconds": time.perf_counter() - t0,
            "store_bytes": sum(p.stat().st_size for p in store.shards())}


# ---------------------------------------------------------------- measurements (child side)

class _Stages:
    """A progress callback that records when each stage is first reported."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.first: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.first.setdefault(stage, time.perf_counter() - self.t0)


def rerun(base: Path, keep: bool = False) -> dict:
    """A fully cached ``featx extract`` (the CLI's path: table streamed from the store)."""
    from featx.extract import extract

    meta = json.loads((base / "set.json").read_text())
    bb = synthetic_backbone(meta["dim"], base)
    out = base / "table.featx.parquet"
    stages = _Stages()
    t = time.perf_counter()
    r = extract(base / "data", bb, store=base / "store", out=out, keep_embeddings=False,
                device="cpu", progress=stages)
    seconds = time.perf_counter() - t
    s = r.stats
    if s.embedded or s.cached != meta["rows"]:
        raise SystemExit(f"not a fully cached run: {s.embedded} embedded, {s.cached} cached of {meta['rows']}")
    size = out.stat().st_size
    if not keep:
        out.unlink()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru.ru_utime + ru.ru_stime  # the process's own CPU time: steadier than wall on a shared machine
    return {"rows": meta["rows"], "dim": meta["dim"], "seconds": seconds,
            "us_per_image": 1e6 * seconds / meta["rows"], "cpu_s": cpu,
            "cpu_us_per_image": 1e6 * cpu / meta["rows"], "seconds_hash": s.seconds_hash,
            "stages": stages.first, "table_bytes": size, "peak_rss_mib": _rss_mib()}


def cache_ops(base: Path) -> dict:
    """Store open, ``cache info``, ``cache verify``, ``cache prune`` (of a namespace holding nothing)."""
    from featx.cache import cache_info, prune_cache, verify_cache
    from featx.embed.store import EmbeddingStore

    meta = json.loads((base / "set.json").read_text())
    root = base / "store"
    out: dict = {"rows": meta["rows"], "dim": meta["dim"]}
    t = time.perf_counter()
    EmbeddingStore(synthetic_backbone(meta["dim"], base), root)
    out["open_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cache_info(root)
    out["info_s"] = time.perf_counter() - t
    t = time.perf_counter()
    rep = verify_cache(root)
    out["verify_s"] = time.perf_counter() - t
    out["verify_ok"] = rep.ok
    out["rss_after_verify_mib"] = _rss_mib()
    # prune a second, small namespace by name: measures the walk over the big one, deletes nothing of it
    EmbeddingStore(synthetic_backbone(7, base), root)
    t = time.perf_counter()
    prune_cache(root, backbone="synthetic-7")
    out["prune_s"] = time.perf_counter() - t
    out["peak_rss_mib"] = _rss_mib()
    return out


def head_stream(table: Path, epochs: int, alphas: list[float], shard_rows: int, workdir: Path) -> dict:
    """``fit-head --head sgd-logreg`` on a table: time and peak RSS (the table is never loaded)."""
    from featx.heads.streaming import fit_streaming_head

    stages = _Stages()
    t = time.perf_counter()
    _, rep = fit_streaming_head(table, epochs=epochs, alphas=alphas, shard_rows=shard_rows,
                                workdir=workdir, progress=stages)
    return {"rows": rep.rows, "dim": rep.dim, "epochs": epochs, "alphas": alphas, "seconds": time.perf_counter() - t,
            "shuffle_s": stages.first.get("epoch", 0.0), "val_accuracy": rep.val_accuracy,
            "max_rows_in_memory": rep.max_rows_in_memory, "peak_rss_mib": _rss_mib()}


def head_accuracy(train: Path, test: Path, workdir: Path) -> dict:
    """The streamed head against the in-memory one (C by CV) on the same real tables."""
    from featx.embed.table import read_table
    from featx.heads.fit import fit_head
    from featx.heads.streaming import fit_streaming_head

    tr, te = read_table(train), read_table(test)
    out: dict = {"train_rows": len(tr), "test_rows": len(te), "dim": tr.X.shape[1]}
    t = time.perf_counter()
    pipe, rep = fit_head(tr.X, tr.labels)
    out["in_memory_s"] = time.perf_counter() - t
    classes = rep["classes"]
    y = np.array([classes.index(v) for v in te.labels])
    out["in_memory_accuracy"] = float((pipe.predict(te.X) == y).mean())
    out["in_memory_C"] = rep.get("C")
    del tr
    t = time.perf_counter()
    spipe, srep = fit_streaming_head(train, workdir=workdir)
    out["streamed_s"] = time.perf_counter() - t
    ys = np.array([srep.classes.index(v) for v in te.labels])
    out["streamed_accuracy"] = float((spipe.predict(te.X) == ys).mean())
    out["streamed_alpha"] = srep.alpha
    out["points_lost"] = 100 * (out["in_memory_accuracy"] - out["streamed_accuracy"])
    return out


def clustered(rows: int, dim: int, seed: int = 0, clusters: int = 1000) -> np.ndarray:
    """Rows near one of ``clusters`` centres (embeddings of a real collection cluster; uniform
    random vectors are HNSW's worst case and nothing like them), float32, normalised."""
    from featx.similarity import normalize

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    X = np.empty((rows, dim), np.float32)
    for s in range(0, rows, 65536):
        n = min(65536, rows - s)
        X[s:s + n] = centres[rng.integers(0, clusters, n)] + 0.7 * rng.standard_normal((n, dim), dtype=np.float32)
    return normalize(X)


def search_bench(rows: int, dim: int, queries: int, k: int = 10) -> dict:
    """Exact (blocked BLAS) vs HNSW on ``rows`` x ``dim``: build, per-query time, recall@k.

    Exact search of all ``rows`` queries (what ``duplicates`` does) is ``rows`` times one
    query: timed on ``queries`` rows and scaled, not run.
    """
    from featx.similarity import approx_topk, exact_topk, hnsw_index, recall_at_k

    X = clustered(rows, dim)
    Q = X[np.random.default_rng(1).permutation(rows)[:queries]]
    t = time.perf_counter()
    _, ex_sim = exact_topk(Q, X, k)
    exact_s = time.perf_counter() - t
    t = time.perf_counter()
    index = hnsw_index(X)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    _, ap_sim = approx_topk(index, Q, k)
    query_s = time.perf_counter() - t
    return {"rows": rows, "dim": dim, "queries": queries, "k": k,
            "exact_ms_per_query": 1e3 * exact_s / queries, "hnsw_build_s": build_s,
            "hnsw_ms_per_query": 1e3 * query_s / queries, "recall_at_k": recall_at_k(ap_sim, ex_sim),
            "exact_all_rows_s_est": exact_s / queries * rows,
            "hnsw_all_rows_s_est": build_s + query_s / queries * rows, "peak_rss_mib": _rss_mib()}


def _child(args: list[str], timeout: float) -> dict:
    """Run this script's ``args`` in a child; its last stdout line is the JSON result."""
    src = os.environ.get("FEATX_SCALE_SRC") or str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src}  # FEATX_SCALE_SRC: another featx checkout, for a baseline
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env,
                       timeout=timeout)
    if p.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def curve(sizes: list[int], dim: int, base: Path, repeats: int, keep: bool) -> list[dict]:
    rows = []
    for n in sizes:
        d = base / f"n{n}-d{dim}"
        if not (d / "set.json").exists():
            made = _child(["make", "--rows", str(n), "--dim", str(dim), str(d)], 7200)
            print(json.dumps({"made": made}), file=sys.stderr, flush=True)
        runs = [_child(["rerun", str(d)], 3600) for _ in range(repeats)]
        best = min(runs, key=lambda r: r["seconds"])
        best["all_seconds"] = [r["seconds"] for r in runs]
        best["cache"] = _child(["cache", str(d)], 3600)
        print(json.dumps(best), file=sys.stderr, flush=True)
        rows.append(best)
        if not keep:
            shutil.rmtree(d)
    return rows


def plot(results: Path, out: Path) -> list[Path]:
    """PNG curves of the JSON rows ``curve`` wrote (``results/*.json``) into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    made = []
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("curve-*.json"))}
    if runs:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, rows in runs.items():
            tag = name.removeprefix("curve-")
            wall = [(r["rows"], r["us_per_image"]) for r in rows if r.get("us_per_image") is not None]
            ax.plot(*zip(*wall, strict=True), "o-", label=f"{tag}: wall")
            cpu = [(r["rows"], r["cpu_us_per_image"]) for r in rows if r.get("cpu_us_per_image") is not None]
            if cpu:
                ax.plot(*zip(*cpu, strict=True), "s--", label=f"{tag}: CPU of the process")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("images (files, store rows, table rows)")
        ax.set_ylabel("µs per image")
        ax.set_title("fully cached `featx extract` re-run, 1,280-dim rows")
        ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(out / "scale-rerun.png")
        fig.savefig(made[-1], dpi=110)
        fig, ax = plt.subplots(figsize=(6, 3.6))
        rows = [r for r in runs[sorted(runs)[-1]] if "cache" in r]
        for op in ("open_s", "info_s", "verify_s", "prune_s"):
            ax.plot([r["rows"] for r in rows], [r["cache"][op] for r in rows], "o-", label=op[:-2])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("store rows")
        ax.set_ylabel("seconds")
        ax.set_title("store open and `featx cache` commands")
        ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(out / "scale-cache.png")
        fig.savefig(made[-1], dpi=110)
    plt.close("all")
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("dir", type=Path)
    m.add_argument("--rows", type=int, required=True)
    m.add_argument("--dim", type=int, default=1280)
    m.add_argument("--shard-size", type=int, default=2048)
    for name in ("rerun", "cache"):
        sub.add_parser(name).add_argument("dir", type=Path)
    c = sub.add_parser("curve")
    c.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    c.add_argument("--dim", type=int, default=1280)
    c.add_argument("--repeats", type=int, default=2)
    c.add_argument("--base", type=Path, default=DEFAULT_BASE)
    c.add_argument("--keep", action="store_true", help="keep each set after measuring it")
    c.add_argument("--json", type=Path, help="also write the rows here")
    h = sub.add_parser("head")
    h.add_argument("table", type=Path)
    h.add_argument("--epochs", type=int, default=1)
    h.add_argument("--alphas", type=float, nargs="+", default=[1e-4])
    h.add_argument("--shard-rows", type=int, default=4096)
    h.add_argument("--workdir", type=Path, default=DEFAULT_BASE)
    a = sub.add_parser("head-accuracy")
    a.add_argument("train", type=Path)
    a.add_argument("test", type=Path)
    a.add_argument("--workdir", type=Path, default=DEFAULT_BASE)
    q = sub.add_parser("search")
    q.add_argument("--rows", type=int, default=1_000_000)
    q.add_argument("--dim", type=int, default=128)
    q.add_argument("--queries", type=int, default=1000)
    pl = sub.add_parser("plot")
    pl.add_argument("results", type=Path)
    pl.add_argument("out", type=Path)
    r = sub.add_parser("rerun-keep", help="a cached re-run that keeps its table (for `head`)")
    r.add_argument("dir", type=Path)
    args = ap.parse_args()

    if args.cmd == "make":
        res = make(args.dir, args.rows, args.dim, args.shard_size)
        (args.dir / "set.json").write_text(json.dumps(res))
    elif args.cmd == "rerun":
        res = rerun(args.dir)
    elif args.cmd == "rerun-keep":
        res = rerun(args.dir, keep=True)
    elif args.cmd == "head":
        res = head_stream(args.table, args.epochs, args.alphas, args.shard_rows, args.workdir)
    elif args.cmd == "head-accuracy":
        res = head_accuracy(args.train, args.test, args.workdir)
    elif args.cmd == "search":
        res = search_bench(args.rows, args.dim, args.queries)
    elif args.cmd == "plot":
        res = [str(p) for p in plot(args.results, args.out)]
    elif args.cmd == "cache":
        res = cache_ops(args.dir)
    elif args.cmd == "curve":
        res = curve(args.sizes, args.dim, args.base, args.repeats, args.keep)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
