"""Shared fixtures: an isolated FEATX_HOME, the real default backbone, real photos."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _fashion_mnist_available() -> bool:
    from featx.datasets import fashion_mnist_available

    return fashion_mnist_available()


needs_fashion_mnist = pytest.mark.skipif(not _fashion_mnist_available(),
                                         reason="needs Debian's dataset-fashion-mnist")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="run long tests (kill/resume loops, ...)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="long test; run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def featx_home(tmp_path_factory) -> Path:
    """Every test session gets its own cache, so nothing leaks from a user's ~/.cache."""
    home = tmp_path_factory.mktemp("featx-home")
    os.environ["FEATX_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def lite0(featx_home):
    """The real default backbone, exported once per session."""
    from featx.backbones.resolve import resolve_backbone

    return resolve_backbone("efficientnet_lite0")


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


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")
