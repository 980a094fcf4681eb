"""Plant label noise in an embeddings table and score ``featx audit``'s label issues against it.

    python bench/audit_noise.py plant TABLE NOISY_TABLE [--rate 0.05 --seed 0]
        writes NOISY_TABLE (same embeddings, labels of a seeded 5% flipped to another class at
        random) and NOISY_TABLE.flipped.txt (the flipped paths)
    python bench/audit_noise.py score NOISY_TABLE AUDIT_DIR
        top-k precision of label_issues.csv (k = flipped), recall and precision at cleanlab's cut
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from featx.embed.table import EmbeddingTable, image_paths, read_table, write_table


def plant(src: str, dst: str, rate: float, seed: int) -> None:
    t = read_table(src)
    rng = np.random.default_rng(seed)
    classes = sorted(set(t.labels))
    n = round(rate * len(t))
    rows = rng.choice(len(t), n, replace=False)
    labels = list(t.labels)
    for i in rows.tolist():
        labels[i] = rng.choice([c for c in classes if c != labels[i]])
    write_table(dst, EmbeddingTable(t.paths, labels, t.keys, t.X, t.meta))
    Path(dst + ".flipped.txt").write_text("".join(t.paths[i] + "\n" for i in sorted(rows.tolist())))
    print(f"{n} of {len(t)} labels flipped -> {dst}")


def score(noisy: str, audit_dir: str) -> None:
    flipped = set(Path(noisy + ".flipped.txt").read_text().split("\n")) - {""}
    # label_issues.csv names files (absolute, as every featx output); the list has table paths
    t = read_table(noisy)
    flipped = {f for p, f in zip(t.paths, image_paths(t, noisy), strict=True) if p in flipped}
    with open(Path(audit_dir) / "label_issues.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    k = len(flipped)
    top = sum(r["path"] in flipped for r in rows[:k])
    flagged = [r for r in rows if r["flagged"] == "True"]
    hit = sum(r["path"] in flipped for r in flagged)
    print(f"flipped {k}; top-{k} of label_issues.csv: {top} flipped (precision {top / k:.3f}); "
          f"cleanlab flagged {len(flagged)}: recall {hit / k:.3f}, precision {hit / max(len(flagged), 1):.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("plant")
    a.add_argument("table")
    a.add_argument("noisy")
    a.add_argument("--rate", type=float, default=0.05)
    a.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("score")
    b.add_argument("noisy")
    b.add_argument("audit_dir")
    args = ap.parse_args()
    if args.cmd == "plant":
        plant(args.table, args.noisy, args.rate, args.seed)
    else:
        score(args.noisy, args.audit_dir)
