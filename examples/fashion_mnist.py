"""Fashion-MNIST: frozen EfficientNet-Lite0 features + a logistic-regression head vs raw pixels.

Needs Debian's Fashion-MNIST (60k train / 10k test):

    sudo apt-get install dataset-fashion-mnist
    .venv/bin/python examples/fashion_mnist.py            # ~10 min on 2 CPU cores, first run
    .venv/bin/python examples/fashion_mnist.py --sizes 100 # quick look

It writes the official splits as PNG folders, runs the same steps as the CLI

    featx extract examples/out/fashion_mnist/train
    featx fit-head --C auto                  # at each training-set size
    featx evaluate head.joblib examples/out/fashion_mnist/test

and fits the raw-pixel baseline (the same scaler + L2 logistic regression, C by the
same CV, on the 784 pixels) on exactly the same images. Extraction is cached, so
a second run only fits heads. Results go to examples/out/fashion_mnist/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "fashion_mnist"


def original_index(paths: list[str]) -> np.ndarray:
    # write_image_folder names each file by its index in the split: <class>/<index>.png
    return np.array([int(Path(p).stem) for p in paths])


def main() -> None:
    from featx.datasets import FASHION_MNIST_CLASSES, fashion_mnist, write_image_folder
    from featx.evaluate import evaluate
    from featx.extract import extract
    from featx.heads.fit import fit_head
    from featx.heads.headfile import save_head
    from featx.sampling import per_class_subset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,all",
                    help="training images per class, comma-separated ('all' = 6000)")
    ap.add_argument("--cv", type=int, default=3, help="CV folds for C auto")
    args = ap.parse_args()
    sizes = [None if s == "all" else int(s) for s in args.sizes.split(",")]

    t0 = time.perf_counter()
    tables = {}
    for split in ("train", "test"):
        x, y = fashion_mnist(split)
        root = write_image_folder(OUT / split, x, y, FASHION_MNIST_CLASSES)  # skips existing files
        print(f"$ featx extract {root.relative_to(HERE.parent)}", flush=True)
        r = extract(root, out=OUT / f"{split}.featx.parquet")
        s = r.summary()
        print(f"  {s['images']} images: {s['embedded']} embedded, {s['cached']} from cache "
              f"({s['seconds']} s)", flush=True)
        tables[split] = (r.table, x)

    train, x_train = tables["train"]
    test, x_test = tables["test"]
    bb = train_bb = None
    from featx.backbones.resolve import resolve_backbone

    bb = train_bb = resolve_backbone(train.meta["backbone_path"])
    names = np.array(train.labels)
    codes = np.unique(names, return_inverse=True)[1]
    raw_test = x_test[original_index(test.paths)].reshape(len(test), -1).astype(np.float32) / 255
    rows = []
    for per_class in sizes:
        idx = per_class_subset(codes, per_class, seed=0)
        n = len(idx)
        raw = x_train[original_index([train.paths[i] for i in idx])].reshape(n, -1).astype(np.float32) / 255
        result = {"per_class": per_class or "all", "n_train": n}
        for kind, X, Xt in (("featx", train.X[idx], test.X), ("raw_pixels", raw, raw_test)):
            t = time.perf_counter()
            pipe, rep = fit_head(X, names[idx], head="logreg", C="auto", cv=args.cv)
            pred = np.array(rep["classes"])[pipe.predict_proba(Xt).argmax(1)]
            acc = float((pred == np.array(test.labels)).mean())
            result[kind] = {"test_accuracy": acc, "C": rep["C"], "cv_score": rep["cv_score_mean"],
                            "cv_std": rep["cv_score_std"], "seconds": round(time.perf_counter() - t, 1)}
            print(f"  {per_class or 'all'}/class {kind:<10}: test accuracy {acc:.4f} "
                  f"(C={rep['C']:g}, CV {rep['cv_score_mean']:.4f} +- {rep['cv_score_std']:.4f})",
                  flush=True)
            if kind == "featx" and per_class is None:
                head = save_head(OUT / "head.joblib", pipe, rep["classes"], train_bb, rep)
        rows.append(result)

    if None in sizes:
        print(f"$ featx evaluate {head.relative_to(HERE.parent)} "
              f"{(OUT / 'test').relative_to(HERE.parent)}", flush=True)
        ev = evaluate(head, OUT / "test", out_dir=OUT / "eval")
        print(f"  accuracy {ev.metrics['accuracy']:.4f}, balanced {ev.metrics['balanced_accuracy']:.4f}; "
              f"confusion matrix: {ev.png_path}", flush=True)

    print(f"\n{'train images':>14} | {'featx (lite0 + logreg)':>22} | {'raw pixels + logreg':>19}")
    for r in rows:
        label = f"{r['per_class']}/class" if r["per_class"] != "all" else f"all ({r['n_train']})"
        print(f"{label:>14} | {r['featx']['test_accuracy']:>22.4f} | {r['raw_pixels']['test_accuracy']:>19.4f}")
    doc = {"backbone": bb.name, "fingerprint": bb.fingerprint, "head": "logreg, C auto",
           "cv_folds": args.cv, "test_images": len(test), "results": rows,
           "seconds": round(time.perf_counter() - t0, 1)}
    (OUT / "results.json").write_text(json.dumps(doc, indent=2))
    print(f"results: {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
