"""The backbone cards have one home, models/ at the repository root, and ship in the wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CARDS = sorted(p.name for p in (ROOT / "models").glob("*.toml"))


def test_models_holds_every_card_and_featx_no_second_copy():
    from featx.backbones.cards import list_cards

    assert "efficientnet_lite0.toml" in CARDS
    assert sorted(f"{c.name}.toml" for c in list_cards()) == CARDS
    assert not list((ROOT / "featx").rglob("*.toml"))  # no second copy inside the package


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """featx's wheel, built offline from a copy of this checkout (no build isolation)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("featx", "models"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--no-index", "-q", "-w", str(out), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return next(out.glob("featx-*.whl"))


def test_the_wheel_ships_every_card_and_every_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"featx/models/{c}" for c in CARDS} <= names
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "featx").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules - names == set()  # every package is listed in pyproject.toml


def test_an_installed_wheel_reads_its_cards_through_importlib_resources(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("from featx.backbones.cards import card_folder, list_cards; "
            "print(next(iter(card_folder().iterdir())).parent); print(','.join(c.name for c in list_cards()))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    folder, names = r.stdout.split()
    assert Path(folder) == site / "featx" / "models"
    assert sorted(f"{n}.toml" for n in names.split(",")) == CARDS
