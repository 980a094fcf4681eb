"""Quickstart: the whole flow on real labelled images with the real pretrained default backbone.

Writes a small labelled Fashion-MNIST set (Debian's dataset-fashion-mnist: 20 images
a class from the official training split, 20 a class from the test split; falls back
to scikit-image's bundled photos), then runs

    featx extract data/train
    featx fit-head                      # the one *.featx.parquet in this folder; C by CV
    featx evaluate head.featx data/test

and prints the test accuracy and where the confusion-matrix PNG is.
Run: .venv/bin/python examples/quickstart.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "quickstart"


def make_data() -> tuple[Path, Path]:
    from featx.datasets import (
        FASHION_MNIST_CLASSES,
        fashion_mnist,
        fashion_mnist_available,
        write_image_folder,
    )
    from featx.sampling import per_class_subset

    root = OUT / "data"
    if fashion_mnist_available():
        out = []
        for split in ("train", "test"):
            x, y = fashion_mnist(split)
            idx = per_class_subset(y, 20)
            out.append(write_image_folder(root / split, x[idx], y[idx], FASHION_MNIST_CLASSES))
        return out[0], out[1]
    import skimage.data as sd
    from PIL import Image, ImageOps

    # no Fashion-MNIST: cats vs other photos, test images are mirrored copies
    for label, names in {"cat": ["chelsea", "cat"], "photo": ["coffee", "rocket", "astronaut"]}.items():
        for split in ("train", "test"):
            (root / split / label).mkdir(parents=True, exist_ok=True)
        for n in names:
            img = Image.fromarray(getattr(sd, n)())
            img.save(root / "train" / label / f"{n}.jpg")
            ImageOps.mirror(img).save(root / "test" / label / f"{n}.jpg")
    return root / "train", root / "test"


def featx(*args: str) -> str:
    cmd = [sys.executable, "-m", "featx.cli", *args]
    print("$ featx " + " ".join(args), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=OUT).stdout
    print(out, end="", flush=True)
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    train, test = make_data()
    featx("extract", str(train), "--out", "train.featx.parquet", "-q")
    featx("fit-head", "--C", "auto")  # CV folds shrink to fit the smallest class
    # --force: eval/ is this script's own output, refreshed on every run (a run of an older
    # featx left an evaluation of head.joblib there, which evaluate will not overwrite unasked)
    featx("evaluate", "head.featx", str(test), "--out-dir", "eval", "--force", "-q")
    m = json.loads((OUT / "eval" / "metrics.json").read_text())
    print(f"\ntest accuracy {m['accuracy']:.1%} on {m['n']} images "
          f"({len(m['labels'])} classes, head fitted on {count(train)} images)")
    print(f"confusion matrix: {OUT / m['confusion_matrix_png']}")


def count(p: Path) -> int:
    return sum(1 for f in p.rglob("*") if f.is_file())


if __name__ == "__main__":
    main()
