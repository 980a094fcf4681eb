"""Helpers that test files import (fixtures stay in conftest.py, which is never imported).

``from .helpers import make_image_folder``: real photos, a skip marker for tests
that need Fashion-MNIST, and a way to run a command without root's power to read
everything (so permission tests run as root too).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _fashion_mnist_available() -> bool:
    from featx.datasets import fashion_mnist_available

    return fashion_mnist_available()


needs_fashion_mnist = pytest.mark.skipif(not _fashion_mnist_available(),
                                         reason="needs Debian's dataset-fashion-mnist")


def photos() -> dict[str, np.ndarray]:
    import skimage.data as sd

    return {"chelsea": sd.chelsea(), "cat": sd.cat(), "coffee": sd.coffee(),
            "astronaut": sd.astronaut(), "rocket": sd.rocket(), "camera": sd.camera()}


def make_image_folder(root: Path, per_class: int = 4) -> Path:
    """A small labelled ImageFolder of real photos: crops and flips of skimage's images.

    Two classes that a linear probe must separate: cats vs (coffee, rocket).
    """
    p = photos()
    groups = {"cat": [p["chelsea"], p["cat"]], "thing": [p["coffee"], p["rocket"]]}
    rng = np.random.default_rng(0)
    for label, srcs in groups.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = srcs[i % len(srcs)]
            h, w = a.shape[:2]
            ch, cw = int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = a[y:y + ch, x:x + cw]
            if i % 2:
                crop = crop[:, ::-1]
            ext = ["jpg", "png", "webp", "JPEG"][i % 4]
            Image.fromarray(np.ascontiguousarray(crop)).save(root / label / f"{label}_{i}.{ext}")
    return root


# Root passes every permission check through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH; a child
# started without them in its bounding set meets permissions as any user would.
_DROP_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def unprivileged(cmd: list[str]) -> list[str]:
    """``cmd`` run so that file permissions apply to it, even when the tests run as root.

    Skips the test (with the reason) where that cannot be arranged.
    """
    if os.geteuid() != 0:
        return cmd
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: cannot drop CAP_DAC_OVERRIDE")
    probe = subprocess.run([*_DROP_DAC, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE here: {probe.stderr.decode().strip()}")
    return [*_DROP_DAC, *cmd]


FM_KEEP = [0, 1, 8]  # t-shirt, trouser, bag: three Fashion-MNIST classes a small probe separates


def fashion_mnist_folder(root: Path, split: str, per_class: int, keep=FM_KEEP) -> Path:
    """An ImageFolder of ``per_class`` Fashion-MNIST PNGs of each class in ``keep`` (seed 3)."""
    from featx.datasets import FASHION_MNIST_CLASSES, fashion_mnist, write_image_folder
    from featx.sampling import per_class_subset

    x, y = fashion_mnist(split)
    idx = per_class_subset(y, per_class, seed=3)
    idx = idx[np.isin(y[idx], keep)]
    write_image_folder(root, x[idx], y[idx], FASHION_MNIST_CLASSES)
    for d in root.iterdir():  # write_image_folder makes every class folder; keep ours
        if not any(d.iterdir()):
            d.rmdir()
    return root


def run_cli(*args: str, ok: bool = True):
    """``featx ARGS`` in this process (click's CliRunner); asserts exit code 0 unless ``ok=False``."""
    from click.testing import CliRunner

    from featx.cli import main

    r = CliRunner().invoke(main, list(args))
    if ok:
        assert r.exit_code == 0, (r.output, r.exception)
    return r
