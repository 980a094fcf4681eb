"""featx sufficiency (featx.sufficiency): the power law, the flags, a real run on Fashion-MNIST PNGs."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from featx.errors import FeatXError
from featx.extract import extract
from featx.sufficiency import (
    _class_curve,
    default_sizes,
    fit_power_law,
    sufficiency,
    write_sufficiency,
)

from .helpers import fashion_mnist_folder, needs_fashion_mnist, run_cli


def test_power_law_recovers_its_parameters():
    n = np.array([2, 4, 8, 16, 32, 64, 128], float)
    a, b, c = fit_power_law(n, 0.8 * n ** -0.6 + 0.05)
    assert a == pytest.approx(0.8, rel=0.02) and b == pytest.approx(0.6, rel=0.02)
    assert c == pytest.approx(0.05, abs=0.005)
    # without a floor (too few points) it is the straight line in log-log
    a, b, c = fit_power_law(n[:3], 0.5 * n[:3] ** -0.5)
    assert (a, b, c) == (pytest.approx(0.5), pytest.approx(0.5), 0.0)


def test_default_sizes_are_log_spaced_and_end_at_the_cap():
    assert default_sizes(100) == [2, 3, 6, 11, 19, 33, 57, 100]
    assert default_sizes(1) == [1]


def test_flags_say_where_the_extrapolation_is_weak():
    sizes = [2, 4, 8, 16, 32, 64]
    n = np.array(sizes, float)
    rising = np.tile(1 - (0.6 * n ** -0.5 + 0.02), (3, 1))
    c = _class_curve("good", 64, 1000, sizes, rising, 0.9)
    assert c.flags == [] and c.needed is not None and c.recall_doubled > c.recall_now
    assert c.predict(c.needed) >= 0.9 - 1e-6
    flat = np.full((3, 6), 0.7) + np.random.default_rng(0).normal(0, 0.02, (3, 6))
    assert "flat" in _class_curve("flat", 64, 1000, sizes, flat, 0.9).flags
    few = _class_curve("few", 64, 20, sizes[:3], rising[:, :3], 0.9)
    assert {"too-few-points", "noisy-test"} <= set(few.flags)
    floor = np.tile(1 - (0.5 * n ** -0.8 + 0.2), (3, 1))  # levels off at 80% recall
    assert "unreachable" in _class_curve("floor", 64, 1000, sizes, floor, 0.9).flags
    # a class with 10 images: the sizes past 10 repeat one subset, only the first is kept
    short = _class_curve("short", 10, 1000, sizes, rising, 0.9)
    assert short.sizes == [2, 4, 8, 10] and "all-images" in short.flags


@needs_fashion_mnist
def test_real_run_writes_png_csv_json(tmp_path):
    train = fashion_mnist_folder(tmp_path / "train", "train", 24)
    test = fashion_mnist_folder(tmp_path / "test", "test", 20)
    t_train = extract(train, out=tmp_path / "train.featx.parquet").out
    t_test = extract(test, out=tmp_path / "test.featx.parquet").out
    r = write_sufficiency(sufficiency(t_train, test=t_test, seeds=2, target=0.95), tmp_path / "suff")
    assert [c.label for c in r.classes] == sorted(d.name for d in train.iterdir())
    assert r.sizes == default_sizes(24)
    for c in r.classes:
        assert c.images == 24 and c.test_images == 20 and len(c.sizes) == len(r.sizes)
        assert 0 <= c.recall_now <= 1 and "noisy-test" in c.flags
    assert (tmp_path / "suff" / "sufficiency.png").stat().st_size > 10_000
    with open(tmp_path / "suff" / "sufficiency.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["class"] for row in rows] == [c.label for c in r.classes]
    doc = json.loads((tmp_path / "suff" / "sufficiency.json").read_text())
    assert doc["law"].startswith("1 - recall") and len(doc["classes"]) == 3
    # without --test: a held-out share of the table, and the CLI
    out = run_cli("sufficiency", str(t_train), "--out", str(tmp_path / "s2"), "--seeds", "1",
                  "--sizes", "2,4,8", "-q").output
    assert "held-out 30%" in out and "too-few-points" in out
    assert (tmp_path / "s2" / "sufficiency.png").is_file()
    # a one-image class: one clear line
    lonely = tmp_path / "lonely"
    shutil.copytree(train, lonely)
    cls = sorted(lonely.iterdir())[0]
    for f in sorted(cls.iterdir())[1:]:
        f.unlink()
    t_lonely = extract(lonely, out=tmp_path / "lonely.featx.parquet").out
    with pytest.raises(FeatXError, match=f"class {cls.name} has one image"):
        sufficiency(t_lonely)
    bad = run_cli("sufficiency", str(t_train), "--sizes", "2,x", ok=False)
    assert bad.exit_code == 2 and "comma-separated" in bad.output
