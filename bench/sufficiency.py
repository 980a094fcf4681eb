"""Does `featx sufficiency` extrapolate? Fit on nested subsets up to M a class, predict each
class's recall at K a class, then measure it there (same seeds: the K subset contains the M one).

    python bench/sufficiency.py TRAIN.featx.parquet TEST.featx.parquet --fit-max 100 --at 200 --seeds 3

Prints one line per class (predicted, measured, error) and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train")
    ap.add_argument("test")
    ap.add_argument("--fit-max", type=int, default=100)
    ap.add_argument("--at", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tolerance", type=float, default=0.03)
    ap.add_argument("--out", default=None, help="also write sufficiency.png/csv/json of the fit here")
    args = ap.parse_args()

    from featx.embed.table import read_table
    from featx.heads.fit import encode_labels
    from featx.sufficiency import default_sizes, learning_curves, sufficiency, write_sufficiency

    r = sufficiency(args.train, test=args.test, sizes=default_sizes(args.fit_max), seeds=args.seeds)
    if args.out:
        write_sufficiency(r, args.out)
    t, tt = read_table(args.train), read_table(args.test)
    codes, classes = encode_labels(t.labels)
    index = {c: i for i, c in enumerate(classes)}
    ct = np.array([index[lbl] for lbl in tt.labels])
    measured = np.nanmean(learning_curves(t.X, codes, tt.X, ct, [args.at], args.seeds, r.C)[:, 0, :], axis=0)
    rows = []
    for i, c in enumerate(r.classes):
        pred = float(c.predict(args.at))
        rows.append({"class": c.label, "at_fit_max": c.recall_now, "predicted": round(pred, 4),
                     "measured": round(float(measured[i]), 4), "error": round(pred - float(measured[i]), 4),
                     "flags": c.flags, "a": c.a, "b": c.b, "c": c.c})
        print(f"{c.label:<12} at {args.fit_max}: {c.recall_now:.3f}  predicted at {args.at}: {pred:.3f}  "
              f"measured: {measured[i]:.3f}  error {100 * (pred - measured[i]):+.1f} points  "
              f"{' '.join(c.flags)}", file=sys.stderr)
    within = sum(abs(row["error"]) <= args.tolerance for row in rows)
    print(f"within {100 * args.tolerance:.0f} points: {within} of {len(rows)}", file=sys.stderr)
    print(json.dumps({"fit_sizes": r.sizes, "at": args.at, "seeds": args.seeds, "within": within,
                      "classes": rows, "seconds": round(r.seconds, 1)}))


if __name__ == "__main__":
    main()
