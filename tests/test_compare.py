"""`featx compare`: a --per-class size the data cannot honour is said and skipped or marked, never silent."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from featx.cli import main
from featx.compare import settle_sizes

from .helpers import make_image_folder


def test_sizes_above_every_class_are_the_all_row():
    labels = np.array([0] * 30 + [1] * 30)
    sizes, notes = settle_sizes([10, 100, None], labels, ["a", "b"])
    assert sizes == [10, None]
    assert notes == ["--per-class 100: no class has more than 30 training images, so 100 per class is the "
                     "'all' row; skipped"]
    sizes, notes = settle_sizes([10, 100, 200], labels, ["a", "b"])
    assert sizes == [10, None]  # measured once, as 'all'
    assert "measured as 'all'" in notes[0] and "is the 'all' row; skipped" in notes[1]


def test_a_size_above_the_smallest_class_is_kept_with_a_note():
    labels = np.array([0] * 30 + [1] * 200 + [2] * 40)
    sizes, notes = settle_sizes([10, 35, 100], labels, ["a", "b", "c"])
    assert sizes == [10, 35, 100]
    assert notes == ["--per-class 35: 1 class has fewer training images and contributes all of them: a (30)",
                     "--per-class 100: 2 classes have fewer training images and contribute all of them: "
                     "a (30), c (40)"]


def test_compare_says_which_rows_the_data_cannot_honour(tmp_path):
    data = make_image_folder(tmp_path / "data")  # 4 images a class
    for f in sorted((data / "thing").iterdir())[2:]:
        f.unlink()  # thing: 2 images
    test = make_image_folder(tmp_path / "test", per_class=2)
    out = tmp_path / "report"
    r = CliRunner().invoke(main, [
        "compare", str(data), "--test", str(test), "--per-class", "1,3,10", "--methods", "frozen",
        "--epochs", "1", "--input-size", "64", "--device", "cpu", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    printed = r.stdout
    assert ("--per-class 10: no class has more than 4 training images, so 10 per class means all of them; "
            "measured as 'all'") in printed
    assert "--per-class 3: 1 class has fewer training images and contributes all of them: thing (2)" in printed
    assert "| 3* | 5 |" in printed and "| all | 6 |" in printed  # the capped row is marked
    assert "1 epoch for the trained methods" in printed and "4 test images" in printed
    report = json.loads((out / "compare.json").read_text())
    assert [(row["per_class"], row["train_images"]) for row in report["rows"]] == [(1, 2), (3, 5), ("all", 6)]
    assert len(report["notes"]) == 2


def test_compare_trains_with_random_erasing_and_a_weight_average(tmp_path):
    """compare's trained methods take finetune's --erase and --ema; a report without them keeps
    its old config keys, so a compare.json written before the options still matches its runs."""
    data = make_image_folder(tmp_path / "data")
    test = make_image_folder(tmp_path / "test", per_class=2)
    out = tmp_path / "report"
    args = ["compare", str(data), "--test", str(test), "--per-class", "all", "--methods", "lpft", "--epochs", "1",
            "--unfreeze", "1", "--input-size", "64", "--device", "cpu", "--out", str(out)]
    r = CliRunner().invoke(main, [*args, "--erase", "0.5", "--ema", "0.9", "--cutmix", "0.5"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    config = json.loads((out / "compare.json").read_text())["config"]
    assert config["erase"] == 0.5 and config["ema"] == 0.9 and config["cutmix"] == 0.5
    from featx.compare import compare

    plain = compare(data, test, out=tmp_path / "plain", per_class="all", methods=("lpft",), epochs=1,
                    unfreeze=1, input_size=64, device="cpu", keep_runs=True)
    assert not {"erase", "ema", "cutmix", "mixup"} & set(plain.config)
    run_cfg = json.loads((tmp_path / "plain" / "runs" / "lpft-all" / "config.json").read_text())["config"]
    assert run_cfg["erase"] == 0.0 and run_cfg["ema"] is None
    compare(data, test, out=tmp_path / "kept", per_class="all", methods=("lpft",), epochs=1, unfreeze=1,
                   input_size=64, device="cpu", keep_runs=True, erase=0.5, ema=0.9, mixup=0.5)
    run_cfg = json.loads((tmp_path / "kept" / "runs" / "lpft-all" / "config.json").read_text())["config"]
    assert run_cfg["erase"] == 0.5 and run_cfg["ema"] == 0.9 and run_cfg["mixup"] == 0.5
