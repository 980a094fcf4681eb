"""Feature recipes on Fashion-MNIST: ``last`` vs ``multi`` (issue 13), through featx end to end.

Run: .venv/bin/python bench/features.py                       # 200 a class, full 10k test
     .venv/bin/python bench/features.py --test-images 2000    # quicker: 200 a class of the test set
     .venv/bin/python bench/features.py --per-class 0         # all 60k training images
     .venv/bin/python bench/features.py --crops center,none   # also the whole-image crop
     .venv/bin/python bench/features.py --per-class 0 --crops none --last-from-multi
                                      # 60k: extract multi only; `last` is its last segment

Needs Debian's dataset-fashion-mnist. For each crop, both recipes of the same
backbone are exported first (not timed), then every split is extracted with
``featx.extract.extract`` into a fresh store (so nothing comes from the cache)
in the order last, multi (train) then multi, last (test), so a drifting machine
load weighs on both alike, and a standardised logistic regression is fitted with
``featx.heads.fit.fit_head(C="auto")``: the same steps as

    featx extract train --features multi --crop none
    featx fit-head --C auto

Prints, in one run, the last-layer baseline beside ``multi``: dimensions, the C
chosen and its CV accuracy, test accuracy, extraction time (and the ratio
multi / last) and the head's fit time. Results go to <work>/features-<tag>.json.
Timings are wall clock on whatever else the machine runs: read the ratios.

``--last-from-multi`` halves a long run: only ``multi`` is extracted and the
``last`` baseline is its final segment (the backbone's own pooled output,
computed in the same graph; cosine to a ``last`` export's rows is printed on the
first 256 training images). Extraction time is then not compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("last", "multi")


def image_folders(work: Path, per_class: int, test_images: int, seed: int) -> tuple[Path, Path]:
    """Fashion-MNIST subsets as PNG ImageFolders (written once, reused by later runs)."""
    from featx.datasets import FASHION_MNIST_CLASSES, fashion_mnist, write_image_folder
    from featx.sampling import per_class_subset

    roots = []
    for split, n in (("train", per_class), ("test", test_images // len(FASHION_MNIST_CLASSES))):
        x, y = fashion_mnist(split)
        idx = per_class_subset(y, n or None, seed)
        root = work / f"{split}-{n or 'all'}-seed{seed}"
        roots.append(write_image_folder(root, x[idx], y[idx], FASHION_MNIST_CLASSES))
    return roots[0], roots[1]


def extract_both(root: Path, backbones: dict, order: tuple[str, ...], work: Path, tag: str,
                 batch_size: int) -> tuple[dict, dict]:
    """Tables and wall seconds of every recipe on ``root``, each into a fresh store."""
    from featx.extract import extract

    tables, seconds = {}, {}
    for name in order:
        store = Path(tempfile.mkdtemp(prefix="store-", dir=work))
        try:
            t = time.perf_counter()
            r = extract(root, backbones[name], out=work / f"{root.name}-{tag}-{name}.featx.parquet",
                        store=store, batch_size=batch_size)
            seconds[name] = time.perf_counter() - t
        finally:
            shutil.rmtree(store, ignore_errors=True)
        tables[name] = r.table
        print(f"  {root.name} {name}: {len(r.table)} images x {r.table.X.shape[1]} in {seconds[name]:.1f} s",
              flush=True)
    return tables, seconds


def probe(train, test) -> dict:
    """featx's head (scaler + logistic regression, C by stratified CV) and its test accuracy."""
    from featx.heads.fit import fit_head

    t = time.perf_counter()
    pipe, rep = fit_head(train.X, train.labels, head="logreg", C="auto")
    fit_s = time.perf_counter() - t
    pred = np.asarray(rep["classes"])[pipe.predict(test.X)]
    return {"dim": int(train.X.shape[1]), "C": rep["C"], "cv_accuracy": rep["cv_score_mean"],
            "test_accuracy": float((pred == np.asarray(test.labels)).mean()), "fit_seconds": round(fit_s, 2),
            "converged": rep["converged"]}


def last_segment(table, backbone):
    """The ``last`` embedding inside a ``multi`` table: its final segment (see backbones.features)."""
    from dataclasses import replace

    seg = backbone.meta["features"]["segments"][-1]
    return replace(table, X=np.ascontiguousarray(table.X[:, seg["start"]:seg["stop"]]))


def slice_check(root: Path, multi_table, backbones: dict, work: Path, n: int = 256) -> float:
    """Lowest cosine between a ``last`` export's rows and the sliced ``multi`` rows on ``n`` images."""
    from featx.embed.runtime import Encoder
    from featx.engines.local import decode_batch

    items = [(i, str(root / p), "") for i, p in enumerate(multi_table.paths[:n])]
    px = decode_batch(items, backbones["last"].preprocess)[2]
    a = Encoder(backbones["last"], device="cpu")(px)
    b = last_segment(multi_table, backbones["multi"]).X[:n]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.min())


def run_crop(crop: str, args, train_root: Path, test_root: Path) -> list[dict]:
    from featx.backbones.resolve import resolve_backbone

    backbones = {f: resolve_backbone(args.backbone, features=f, crop=crop) for f in RECIPES}
    tag = f"{args.backbone}-{crop}"
    if args.last_from_multi:
        only = {"multi": backbones["multi"]}
        tr, s_tr = extract_both(train_root, only, ("multi",), args.work, tag, args.batch_size)
        te, s_te = extract_both(test_root, only, ("multi",), args.work, tag, args.batch_size)
        tr["last"], te["last"] = (last_segment(t["multi"], backbones["multi"]) for t in (tr, te))
        s_tr["last"] = s_te["last"] = float("nan")
        print(f"  last = multi's last segment; lowest cosine to a last export on 256 images: "
              f"{slice_check(train_root, tr['multi'], backbones, args.work):.6f}", flush=True)
    else:
        tr, s_tr = extract_both(train_root, backbones, RECIPES, args.work, tag, args.batch_size)
        te, s_te = extract_both(test_root, backbones, RECIPES[::-1], args.work, tag, args.batch_size)
    rows = []
    for f in RECIPES:
        row = {"backbone": args.backbone, "crop": crop, "features": f, "train_images": len(tr[f]),
               "test_images": len(te[f]), "fingerprint": backbones[f].fingerprint,
               "extract_seconds": round(s_tr[f] + s_te[f], 2), **probe(tr[f], te[f])}
        rows.append(row)
        print(f"  {crop}/{f}: C={row['C']:g}, CV {row['cv_accuracy']:.4f}, test {row['test_accuracy']:.4f}, "
              f"fit {row['fit_seconds']} s", flush=True)
    rows[1]["extract_ratio"] = round(rows[1]["extract_seconds"] / rows[0]["extract_seconds"], 3)
    rows[1]["gain_points"] = round(100 * (rows[1]["test_accuracy"] - rows[0]["test_accuracy"]), 2)
    return rows


def table(rows: list[dict]) -> list[str]:
    out = ["| crop | features | dim | C (auto) | CV accuracy | test accuracy | extraction s (multi/last) "
           "| fit-head s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f" ({r['extract_ratio']:.2f}x)" if "extract_ratio" in r else ""
        gain = f" ({r['gain_points']:+.2f})" if "gain_points" in r else ""
        out.append(f"| {r['crop']} | {r['features']} | {r['dim']} | {r['C']:g} | {100 * r['cv_accuracy']:.2f}% "
                   f"| {100 * r['test_accuracy']:.2f}%{gain} | {r['extract_seconds']:.1f}{ratio} "
                   f"| {r['fit_seconds']:.1f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=200, help="training images a class (0: all 60k)")
    ap.add_argument("--test-images", type=int, default=0,
                    help="test images, the same number a class (0: the full official 10k)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--crops", default="center", help="comma-separated: center, none")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--last-from-multi", action="store_true",
                    help="extract multi only; the last baseline is its final segment")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "features")
    args = ap.parse_args()

    from featx.atomic import write_text

    args.work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs", flush=True)
    train_root, test_root = image_folders(args.work, args.per_class, args.test_images, args.seed)
    rows = []
    for crop in args.crops.split(","):
        rows += run_crop(crop.strip(), args, train_root, test_root)
    lines = table(rows)
    print("\n".join(["", *lines]))
    end = os.getloadavg()
    print(f"load average at end: {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}")
    tag = f"{args.backbone}-{args.per_class or 'all'}pc-{args.test_images or 'all'}test"
    write_text(args.work / f"features-{tag}.json",
               json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "load_start": load,
                           "load_end": end, "rows": rows, "table": lines}, indent=2))


if __name__ == "__main__":
    main()
