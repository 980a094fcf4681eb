"""Real offline datasets for examples, tests and benchmarks.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package
(``apt-get install dataset-fashion-mnist``); nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from featx.errors import FeatXError

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle-boot"]


def fashion_mnist_available() -> bool:
    return (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the official ``train`` or ``test`` split."""
    if split not in ("train", "test"):
        raise FeatXError(f"split must be 'train' or 'test', got {split!r}")
    if not fashion_mnist_available():
        raise FeatXError(
            f"Fashion-MNIST not found in {FASHION_MNIST_DIR}; install it with "
            "`apt-get install dataset-fashion-mnist` (or set FASHION_MNIST_DIR)"
        )
    prefix = "train" if split == "train" else "t10k"
    x = _idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
    y = _idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return x, y


def write_image_folder(root: str | os.PathLike, images: np.ndarray, labels: np.ndarray,
                       class_names: list[str], fmt: str = "png") -> Path:
    """Write arrays as an ImageFolder tree ``root/<class>/<index>.<fmt>`` (skips existing files)."""
    from PIL import Image

    root = Path(root)
    for name in class_names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        p = root / class_names[int(lab)] / f"{i:06d}.{fmt}"
        if not p.exists():
            Image.fromarray(img).save(p)
    return root
