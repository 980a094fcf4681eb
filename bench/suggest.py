"""Label efficiency of `featx suggest` on cached embeddings, and its speed on a big pool.

    # curves: start 10 a class from the pool, rounds of 100, heads as suggest fits them
    python bench/suggest.py curves POOL.featx.parquet TEST.featx.parquet \
        --strategies margin,margin+diversity,random --seeds 0,1,2 --rounds 9 --out curves.json

    # speed: suggest on a pool table of N rows (synthetic embeddings unless --pool is given)
    python bench/suggest.py speed --rows 50000 --labelled LABELLED.featx.parquet [--head HEAD]

    # the figure: mean curves of one or more curves JSON files
    python bench/suggest.py plot curves.json ... --png docs/img/suggest-curves-fmnist.png

The pool's labels play the oracle: each round the chosen images get their true label.
Accuracy is on every image of TEST. Every round refits the head exactly as `featx
suggest` does (featx.suggest.rank: logistic regression, C by cross-validation), and the
same head is the one scored on TEST.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def curves(args) -> dict:
    from featx.embed.table import read_table
    from featx.heads.fit import one_blas_thread
    from featx.sampling import per_class_subset
    from featx.suggest import rank

    pool, test = read_table(args.pool), read_table(args.test)
    y = np.asarray(pool.labels)
    yt = np.asarray(test.labels)
    out: dict = {"pool": len(pool), "test": len(test), "start_per_class": args.start, "batch": args.batch,
                 "rounds": args.rounds, "curves": {}}
    for strategy in args.strategies.split(","):
        per_seed = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            lab = list(per_class_subset(y, args.start, seed=seed))
            sizes, accs = [], []
            for r in range(args.rounds + 1):
                mask = np.ones(len(y), bool)
                mask[lab] = False
                rest = np.flatnonzero(mask)
                t0 = time.perf_counter()
                n = args.batch if r < args.rounds else 1
                picks, _, _, rep = rank(pool.X[lab], y[lab], pool.X[rest], n, strategy, seed=seed)
                with one_blas_thread():
                    pred = np.asarray(rep["classes"])[rep["pipeline"].predict(test.X)]
                acc = float((pred == yt).mean())
                sizes.append(len(lab))
                accs.append(acc)
                print(f"{strategy} seed {seed} labels {len(lab)}: {acc:.4f} (C={rep['C']}, "
                      f"{time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
                if r < args.rounds:
                    lab.extend(rest[picks].tolist())
            per_seed.append(accs)
        out["curves"][strategy] = {"labels": sizes, "accuracy_per_seed": per_seed,
                                   "accuracy_mean": np.mean(per_seed, axis=0).round(4).tolist()}
        Path(args.out).write_text(json.dumps(out, indent=2))
    return out


def speed(args) -> dict:
    import tempfile

    from featx.embed.table import EmbeddingTable, read_table, write_table
    from featx.suggest import suggest

    lab = read_table(args.labelled)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        # synthetic pool: labelled embeddings resampled with noise (same dim, same fingerprint);
        # extracting 50,000 real images took too long on the shared machine
        idx = rng.integers(0, len(lab), args.rows)
        X = (lab.X[idx] + rng.normal(0, lab.X.std() * 0.5, (args.rows, lab.X.shape[1]))).astype(np.float32)
        keys = [f"synthetic{i:08d}" for i in range(args.rows)]
        pool = write_table(Path(d) / "pool.featx.parquet",
                           EmbeddingTable([f"img{i}.png" for i in range(args.rows)], [None] * args.rows, keys, X,
                                          {**lab.meta, "root": d}))
        t0, c0 = time.perf_counter(), time.process_time()
        base = read_table(pool)  # the baseline, side by side: reading the pool table alone
        res = {"read the pool table (baseline)": {"seconds": round(time.perf_counter() - t0, 2),
                                                  "cpu_seconds": round(time.process_time() - c0, 2)}}
        del base
        for strategy in args.strategies.split(","):
            for head in [None, args.head] if args.head else [None]:
                t0, c0 = time.perf_counter(), time.process_time()
                r = suggest(pool, args.labelled, args.n, strategy=strategy, head=head)
                name = f"{strategy} {'--head' if head else 'fit here'}"
                # CPU seconds (all threads) beside wall: on a loaded shared machine wall time
                # measures the other users; CPU time is what the work itself costs
                res[name] = {"seconds": round(time.perf_counter() - t0, 2),
                             "cpu_seconds": round(time.process_time() - c0, 2), "stages": r.seconds}
                print(name, res[name], file=sys.stderr, flush=True)
    return {"rows": args.rows, "labelled": len(lab), "n": args.n, "strategies": res}


def plot(args) -> dict:
    """One figure of the mean curves in the JSON files (and a table of them, returned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from featx.atomic import save_figure

    curves_ = {}
    for f in args.json:
        curves_.update(json.loads(Path(f).read_text())["curves"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves_.items():
        acc = np.asarray(c["accuracy_per_seed"])
        ax.errorbar(c["labels"], 100 * acc.mean(0), yerr=100 * acc.std(0), marker="o", ms=3, capsize=2,
                    label=f"{name} ({len(acc)} seeds)")
    ax.set_xlabel("labelled images")
    ax.set_ylabel("test accuracy, % (10,000 images)")
    ax.set_title("Fashion-MNIST, pool 20,000, start 10 a class, rounds of 100", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, args.png)
    return {name: dict(zip(c["labels"], c["accuracy_mean"], strict=True)) for name, c in curves_.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("curves")
    c.add_argument("pool")
    c.add_argument("test")
    c.add_argument("--strategies", default="margin,margin+diversity,random")
    c.add_argument("--seeds", default="0,1,2")
    c.add_argument("--start", type=int, default=10)
    c.add_argument("--batch", type=int, default=100)
    c.add_argument("--rounds", type=int, default=9)
    c.add_argument("--out", default="suggest-curves.json")
    s = sub.add_parser("speed")
    s.add_argument("--labelled", required=True)
    s.add_argument("--rows", type=int, default=50_000)
    s.add_argument("-n", type=int, default=100)
    s.add_argument("--head", default=None, help="also time with this head of LABELLED (suggest --head)")
    s.add_argument("--strategies", default="margin,margin+diversity,margin+coreset,random")
    p = sub.add_parser("plot")
    p.add_argument("json", nargs="+")
    p.add_argument("--png", default="suggest-curves.png")
    args = ap.parse_args()
    print(json.dumps({"curves": curves, "speed": speed, "plot": plot}[args.what](args)))


if __name__ == "__main__":
    main()
