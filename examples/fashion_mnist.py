"""Fashion-MNIST: frozen EfficientNet-Lite0 features + a logistic-regression head vs raw pixels.

Needs Debian's Fashion-MNIST (60k train / 10k test):

    sudo apt-get install dataset-fashion-mnist
    .venv/bin/python examples/fashion_mnist.py        # ~20 min on 2 CPU cores, first run
    .venv/bin/python examples/fashion_mnist.py --sizes 100 --test-per-class 100   # quick look, ~1 min

It writes the official splits as PNG folders, runs the same steps as the CLI

    featx extract examples/out/fashion_mnist/train
    featx fit-head --C auto                  # at each training-set size
    featx evaluate head.featx examples/out/fashion_mnist/test

and fits the raw-pixel baseline (the same scaler + L2 logistic regression, C by the
same CV, on the 784 pixels) on exactly the same images. Only the images the sizes
use are written and embedded: without 'all' in --sizes, the training folder holds
the largest size's images (train-<N>-a-class/), and --test-per-class N tests on a
subset of the test split (test-<N>-a-class/). A size picks the same images whatever
else is asked for, and embeddings are cached by content, so a later, larger run only
embeds what is new. Results go to examples/out/fashion_mnist/results.json.
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
    # files are named by their index in the split: <class>/<index>.png
    return np.array([int(Path(p).stem) for p in paths])


def pick(y: np.ndarray, per_class: int | None, class_names: list[str]) -> np.ndarray:
    """Indices (into the split) of ``per_class`` images a class, as ``featx extract`` of the whole
    split followed by ``per_class_subset`` on its table would pick them.

    The table lists class folders in name order and files by index; drawing from that
    order keeps every size's images the same whether the folder holds the whole split
    or only what the largest size needs. The sizes are nested (100 a class within 1000).
    """
    from featx.sampling import per_class_subset

    names = np.array(class_names)[y]
    order = np.lexsort((np.arange(len(y)), names))  # the table's row order
    codes = np.unique(names[order], return_inverse=True)[1]
    return np.sort(order[per_class_subset(codes, per_class, seed=0)])


def write_images(root: Path, x: np.ndarray, y: np.ndarray, idx: np.ndarray,
                 class_names: list[str]) -> Path:
    """``root/<class>/<index>.png`` for the images ``idx`` of a split (existing files are kept)."""
    from PIL import Image

    for name in class_names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in idx:
        p = root / class_names[int(y[i])] / f"{i:06d}.png"
        if not p.exists():
            Image.fromarray(x[i]).save(p)
    return root


def extract_split(split: str, per_class: int | None, out: Path):
    """Write (the needed part of) a split as PNGs and extract it; returns (table, all images, labels)."""
    from featx.datasets import FASHION_MNIST_CLASSES, fashion_mnist
    from featx.extract import extract

    x, y = fashion_mnist(split)
    folder = split if per_class is None else f"{split}-{per_class}-a-class"
    root = write_images(out / folder, x, y, pick(y, per_class, FASHION_MNIST_CLASSES),
                        FASHION_MNIST_CLASSES)
    print(f"$ featx extract {root}", flush=True)
    r = extract(root, out=out / f"{folder}.featx.parquet")
    s = r.summary()
    print(f"  {s['images']} images: {s['embedded']} embedded, {s['cached']} from cache "
          f"({s['seconds']} s)", flush=True)
    return r.table, x, y, root


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,all",
                    help="training images per class, comma-separated ('all' = 6000)")
    ap.add_argument("--test-per-class", default="all",
                    help="test images per class ('all' = the whole 10k test split)")
    ap.add_argument("--cv", type=int, default=3, help="CV folds for C auto")
    ap.add_argument("--out", type=Path, default=OUT, help="working folder (default: %(default)s)")
    return ap.parse_args()


def main() -> None:
    from featx.evaluate import evaluate
    from featx.heads.fit import fit_head
    from featx.heads.headfile import save_head

    args = parse_args()
    sizes = [None if s == "all" else int(s) for s in args.sizes.split(",")]
    largest = None if None in sizes else max(sizes)
    test_per_class = None if args.test_per_class == "all" else int(args.test_per_class)
    out = args.out

    t0 = time.perf_counter()
    train, x_train, y_train, _ = extract_split("train", largest, out)
    test, x_test, _, test_root = extract_split("test", test_per_class, out)
    from featx.backbones.resolve import resolve_backbone
    from featx.datasets import FASHION_MNIST_CLASSES

    bb = train_bb = resolve_backbone(train.meta["backbone_path"])
    names = np.array(train.labels)
    row_of = {j: i for i, j in enumerate(original_index(train.paths))}
    raw_test = x_test[original_index(test.paths)].reshape(len(test), -1).astype(np.float32) / 255
    rows = []
    for per_class in sizes:
        idx = np.sort([row_of[j] for j in pick(y_train, per_class, FASHION_MNIST_CLASSES) if j in row_of])
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
                head = save_head(out / "head.featx", pipe, rep["classes"], train_bb, rep)
        rows.append(result)

    if None in sizes:
        print(f"$ featx evaluate {head} {test_root} --out-dir {out / 'eval'}", flush=True)
        ev = evaluate(head, test_root, out_dir=out / "eval")
        print(f"  accuracy {ev.metrics['accuracy']:.4f}, balanced {ev.metrics['balanced_accuracy']:.4f}; "
              f"confusion matrix: {ev.png_path}", flush=True)

    print(f"\n{'train images':>14} | {'featx (lite0 + logreg)':>22} | {'raw pixels + logreg':>19}")
    for r in rows:
        label = f"{r['per_class']}/class" if r["per_class"] != "all" else f"all ({r['n_train']})"
        print(f"{label:>14} | {r['featx']['test_accuracy']:>22.4f} | {r['raw_pixels']['test_accuracy']:>19.4f}")
    doc = {"backbone": bb.name, "fingerprint": bb.fingerprint, "head": "logreg, C auto",
           "cv_folds": args.cv, "test_images": len(test), "test_per_class": test_per_class or "all",
           "train_images_embedded": len(train), "results": rows,
           "seconds": round(time.perf_counter() - t0, 1)}
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
