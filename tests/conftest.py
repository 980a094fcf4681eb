"""Shared fixtures: an isolated FEATX_HOME, the real default backbone, real photos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .helpers import make_image_folder


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


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")
