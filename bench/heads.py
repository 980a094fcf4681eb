"""Head fitting: `fit-head --C auto` vs sklearn's LogisticRegressionCV defaults vs an exhaustive grid.

Run: .venv/bin/python bench/heads.py [--per-class 1000] [--train T.parquet --test T.parquet]
     .venv/bin/python bench/heads.py --per-class 0 --train bench/out/features/train-all-seed0-efficientnet_lite0-none-multi.featx.parquet \
         --test bench/out/features/test-all-seed0-efficientnet_lite0-none-multi.featx.parquet \
         --skip-lrcv --skip-grid --baseline-ref 58ec898    # 60k x 4880 multi: today's C search vs the old one

Uses the Fashion-MNIST embedding tables written by examples/fashion_mnist.py
(default backbone; run that first, or pass --train/--test). Prints, in one run,
on the same training rows: wall time and test accuracy of featx's C="auto"
(stratified CV on at most 10,000 rows, then one fit on everything);
LogisticRegressionCV with its defaults (Cs=10, 5 folds) after the same scaler;
and the exhaustive grid: one fit per C of featx's grid on all training rows, the
best by *test* accuracy (an oracle, the most a C choice could get).
``--baseline-ref REF`` also times ``fit_head`` as featx/heads/fit.py was at git REF,
on the same rows in the same run (the C search before a change).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EX = ROOT / "examples" / "out" / "fashion_mnist"


def fit_head_at(ref: str):
    """``fit_head`` from featx/heads/fit.py at git ``ref`` (it imports only featx's base modules)."""
    src = subprocess.check_output(["git", "show", f"{ref}:featx/heads/fit.py"], cwd=ROOT, text=True)
    mod = types.ModuleType(f"featx_heads_fit_at_{ref}")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(src, f"{ref}:featx/heads/fit.py", "exec"), mod.__dict__)
    return mod.fit_head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, default=EX / "train.featx.parquet")
    ap.add_argument("--test", type=Path, default=EX / "test.featx.parquet")
    ap.add_argument("--per-class", type=int, default=1000, help="training rows per class (0: all)")
    ap.add_argument("--skip-lrcv", action="store_true", help="skip LogisticRegressionCV (slow on 60k)")
    ap.add_argument("--columns", default=None, metavar="START:STOP",
                    help="only these embedding columns (multi's last segment: 3600:4880)")
    ap.add_argument("--skip-grid", action="store_true", help="skip the exhaustive test-oracle grid")
    ap.add_argument("--baseline-ref", default=None, metavar="REF",
                    help="also time fit_head as it was at this git ref, same rows")
    a = ap.parse_args()
    if not a.train.is_file():
        raise SystemExit(f"{a.train} not found: run examples/fashion_mnist.py first (or pass --train/--test)")

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featx.embed.table import read_table
    from featx.heads.fit import C_GRID, fit_head
    from featx.sampling import per_class_subset

    warnings.simplefilter("ignore", ConvergenceWarning)
    tr, te = read_table(a.train), read_table(a.test)
    if a.columns:  # e.g. the `last` segment of a multi table: 3600:4880
        start, stop = (int(v) for v in a.columns.split(":"))
        tr.X, te.X = np.ascontiguousarray(tr.X[:, start:stop]), np.ascontiguousarray(te.X[:, start:stop])
    classes = sorted(set(tr.labels))
    ytr = np.array([classes.index(v) for v in tr.labels])
    yte = np.array([classes.index(v) for v in te.labels])
    idx = per_class_subset(ytr, a.per_class or None, seed=0)
    X, y = tr.X[idx], ytr[idx]
    rows = {}

    t = time.perf_counter()
    pipe, rep = fit_head(X, y, head="logreg", C="auto")
    rows["featx fit-head --C auto"] = (time.perf_counter() - t, pipe.score(te.X, yte), rep["C"])
    print(f"featx: {rows['featx fit-head --C auto'][0]:.1f} s, C={rep['C']:g}, tried "
          f"{[g['C'] for g in rep['cv_grid']]}, skipped {rep.get('cv_skipped')}", flush=True)
    if a.baseline_ref:
        t = time.perf_counter()
        pipe, rep = fit_head_at(a.baseline_ref)(X, y, head="logreg", C="auto")
        rows[f"featx at {a.baseline_ref}"] = (time.perf_counter() - t, pipe.score(te.X, yte), rep["C"])

    if not a.skip_lrcv:
        t = time.perf_counter()
        lrcv = make_pipeline(StandardScaler(), LogisticRegressionCV(max_iter=1000)).fit(X, y)
        rows["LogisticRegressionCV defaults"] = (time.perf_counter() - t, lrcv.score(te.X, yte),
                                                 float(lrcv[-1].C_[0]))
    if not a.skip_grid:
        t = time.perf_counter()
        grid = []
        for C in C_GRID:
            m = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000)).fit(X, y)
            grid.append((m.score(te.X, yte), C))
        best = max(grid)
        rows["exhaustive grid (test oracle)"] = (time.perf_counter() - t, best[0], best[1])

    load = os.getloadavg()
    print(f"\nheads on {len(X)} x {X.shape[1]} Fashion-MNIST embeddings, test on {len(yte)} "
          f"(load average {load[0]:.1f} at the end, {os.cpu_count()} CPUs)")
    base = rows["featx fit-head --C auto"]
    for name, (sec, acc, C) in rows.items():
        print(f"  {name:<32} {sec:7.1f} s  test {100 * acc:6.2f}%  C={C:g}  "
              f"({sec / base[0]:.1f}x featx's time, {100 * (acc - base[1]):+.2f} points vs featx)")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "heads.json").write_text(json.dumps({k: {"seconds": v[0], "accuracy": v[1], "C": v[2]}
                                                for k, v in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
