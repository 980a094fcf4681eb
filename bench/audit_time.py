"""Time featx's out-of-fold probabilities against a plain 5-fold ``cross_val_predict``, side by side.

    python bench/audit_time.py TABLE [--baseline-C 0.001] [--save PROBA.npz]

Both run in this process on the same table, one after the other, each with the BLAS
pools held to one thread per fit as fit-head does; wall and CPU seconds (the process's
user + system time, all threads) are printed for both. On a shared machine the wall
figures drift with the other jobs' load; the CPU seconds and the ratio are the steadier
figures.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("table")
    ap.add_argument("--baseline-C", type=float, default=None,
                    help="C of the baseline (default: the one featx chose); the baseline searches no C")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--save", default=None)
    args = ap.parse_args()
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from featx.embed.table import read_table
    from featx.heads.fit import make_head, one_blas_thread
    from featx.heads.oof import oof_proba

    t = read_table(args.table)
    print(f"{args.table}: {t.X.shape[0]} x {t.X.shape[1]}", flush=True)
    w0, c0 = time.perf_counter(), time.process_time()
    r = oof_proba(t.X, t.labels)
    w1, c1 = time.perf_counter(), time.process_time()
    print(f"featx oof_proba: wall {w1 - w0:.1f} s, CPU {c1 - c0:.1f} s; C {r.C:g}, {r.folds} folds, "
          f"{len(r.grid)} C values, OOF accuracy {r.summary()['oof_accuracy']:.4f}", flush=True)
    if args.save:
        np.savez(args.save, proba=r.proba, codes=r.codes, classes=np.array(r.classes))
    if args.skip_baseline:
        return
    C = args.baseline_C or r.C
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    with one_blas_thread():
        w0, c0 = time.perf_counter(), time.process_time()
        P = cross_val_predict(make_head("logreg", C), t.X, r.codes, cv=cv, method="predict_proba")
        w1, c1 = time.perf_counter(), time.process_time()
    print(f"baseline cross_val_predict (5 folds, one C={C:g}, no search): wall {w1 - w0:.1f} s, "
          f"CPU {c1 - c0:.1f} s; OOF accuracy {(P.argmax(1) == r.codes).mean():.4f}", flush=True)


if __name__ == "__main__":
    main()
