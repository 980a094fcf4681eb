"""Quickstart: the main job on real images with the real pretrained default backbone.

Writes a small labelled Fashion-MNIST folder (Debian's dataset-fashion-mnist; falls
back to scikit-image's bundled photos), runs `featx extract` on it and shows the table.
Run: .venv/bin/python examples/quickstart.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "quickstart"


def make_data() -> Path:
    from featx.datasets import (
        FASHION_MNIST_CLASSES,
        fashion_mnist,
        fashion_mnist_available,
        subsample,
        write_image_folder,
    )

    root = OUT / "data"
    if fashion_mnist_available():
        x, y = fashion_mnist("train")
        idx = subsample(y, 20)
        return write_image_folder(root / "train", x[idx], y[idx], FASHION_MNIST_CLASSES)
    import skimage.data as sd
    from PIL import Image

    for label, names in {"cat": ["chelsea", "cat"], "photo": ["coffee", "rocket", "astronaut"]}.items():
        (root / "train" / label).mkdir(parents=True, exist_ok=True)
        for n in names:
            Image.fromarray(getattr(sd, n)()).save(root / "train" / label / f"{n}.jpg")
    return root / "train"


def featx(*args: str) -> None:
    cmd = [sys.executable, "-m", "featx.cli", *args]
    print("$ featx " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    train = make_data()
    table = OUT / "train.featx.parquet"
    featx("extract", str(train), "--out", str(table))
    import pandas as pd

    df = pd.read_parquet(table)
    print(f"\n{len(df)} embeddings of dim {len(df.embedding.iloc[0])}; first rows:")
    print(df.assign(embedding=df.embedding.map(lambda e: f"[{e[0]:.3f}, {e[1]:.3f}, ...]")).head())


if __name__ == "__main__":
    main()
