"""featx compare: numbered progress, a fresh bar each epoch, resume after Ctrl-C, and a backbone
that cannot be had costing only its own row (issue 27, items 4 and 10)."""

from __future__ import annotations

import json
import time

import pytest

from featx.cli.options import Progress
from featx.compare import compare
from featx.compare_features import compare_features

from .helpers import make_image_folder


def test_each_epoch_gets_a_fresh_numbered_bar(capsys):
    p = Progress(enabled=True)
    for b in range(11):
        p("[2/6] epoch", b, 10)
    first = p.bar.start_t
    assert p.bar.desc.startswith("[2/6] epoch 1") and p.bar.unit == "batch"
    time.sleep(0.05)
    p("[2/6] epoch", 0, 10)  # the next epoch starts over
    assert p.bar.start_t > first and p.bar.n == 0
    assert p.bar.desc.startswith("[2/6] epoch 2")
    p("[2/6] epoch", 5, 10)
    assert p.bar.n == 5 and p.bar.desc.startswith("[2/6] epoch 2")
    p.close()


def test_the_whole_compare_has_an_eta():
    """RunClock: each method's seconds per unit of work (images x epochs) prices the runs left."""
    from featx.compare import RunClock, run_work

    todo = [("frozen", run_work("frozen", 8, 5)), ("lpft", run_work("lpft", 8, 5)),
            ("frozen", run_work("frozen", 16, 5)), ("lpft", run_work("lpft", 16, 5))]
    clock = RunClock(todo)
    assert clock.eta() is None  # nothing timed, and a trained run to come
    clock.finished("frozen", 8.0, 2.0)
    assert clock.eta() is None  # the frozen probe's speed says nothing of training
    clock.finished("lpft", 40.0, 10.0)
    assert clock.eta() == pytest.approx(16 * 0.25 + 80 * 0.25)
    seen = []
    clock.report(lambda s, d, t: seen.append((s, d, t)), 2, 4)
    assert seen[0][0] == "runs 2/4" and seen[0][2] - seen[0][1] == 24
    clock.finished("frozen", 16.0, 4.0)
    clock.finished("lpft", 80.0, 20.0)
    assert clock.eta() == 0.0
    assert RunClock([("scratch", 10.0)]).eta() is None
    only_frozen = RunClock([("frozen", 10.0)])
    assert only_frozen.eta() == 0.0  # a logistic fit on cached embeddings: as good as free


def test_frozen_compare_resumes_finished_rows(lite0, tmp_path):
    data = make_image_folder(tmp_path / "data")
    test = make_image_folder(tmp_path / "test", per_class=2)
    out = tmp_path / "report"
    opts = {"per_class": "2,all", "methods": ("frozen",), "out": out, "device": "cpu", "input_size": 64}
    first = compare(data, test, **opts)
    seen = []
    again = compare(data, test, progress=lambda s, d, t: seen.append(s), **opts)
    assert again.rows == first.rows  # kept as they were, seconds and all: nothing retrained
    assert not any("frozen @" in s for s in seen)
    assert [s for s in seen if s.startswith("runs ")] == ["runs 2/2"]  # both kept: done at once
    other = compare(data, test, **{**opts, "seed": 1})  # other settings: nothing is reused
    assert [r["seconds"] for r in other.rows] != [r["seconds"] for r in first.rows]
    saved = json.loads((out / "compare.json").read_text())
    assert saved["config"]["seed"] == 1


def test_a_backbone_that_cannot_be_had_costs_only_its_row(lite0, tmp_path):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "report"
    seen = []
    r = compare_features(data, backbones=("efficientnet_lite0", "no_such_card"), features=("last",),
                         out=out, cv=2, device="cpu", progress=lambda s, d, t: seen.append(s))
    ok, bad = r.rows
    assert ok["backbone"] == "efficientnet_lite0" and "cv_accuracy" in ok and r.best is ok
    assert bad["backbone"] == "no_such_card" and "no_such_card" in bad["error"]
    assert any(s.startswith("[1/2] ") for s in seen) and any(s.startswith("[2/2] ") for s in seen)
    md = (out / "features.md").read_text()
    assert "| no_such_card | last | center | - | failed: " in md
    again = compare_features(data, backbones=("efficientnet_lite0", "no_such_card"), features=("last",),
                             out=out, cv=2, device="cpu")
    assert again.rows[0] == ok  # the finished probe is kept, not fitted again


def test_no_combination_at_all_is_an_error(tmp_path):
    from featx.errors import FeatXError

    data = make_image_folder(tmp_path / "data", per_class=2)
    with pytest.raises(FeatXError, match="no combination could be scored: no_such_card last crop=center"):
        compare_features(data, backbones=("no_such_card",), features=("last",), out=tmp_path / "r", cv=2)


def test_the_first_export_shows_and_ctrl_c_there_says_what_happened(capsys):
    from featx.cli.main import interrupted_message
    from featx.cli.options import last_stage, progress_bar

    with progress_bar() as p:
        p.enabled = True
        p("scan", 0, 0)
        p("backbone", 0, 0)
        assert p.bar is not None and "exported to ONNX on first use" in p.bar.desc
        assert last_stage() == "backbone"
    said = interrupted_message("extract", last_stage())
    assert "backbone was being exported" in said and "embedded so far is saved" not in said
    assert "embedded so far is saved" in interrupted_message("extract", "embed")
    assert "resumes after them" in interrupted_message("compare", "[3/9] epoch")


def test_probes_default_to_extracts_features(lite0, tmp_path):
    """--backbones alone scores each backbone as `featx extract` would embed with it (multi)."""
    data = make_image_folder(tmp_path / "data")
    r = compare(data, backbones=("efficientnet_lite0",), methods=(), out=tmp_path / "report", device="cpu")
    assert [(row["features"], row["dim"]) for row in r.rows] == [("multi", 4880)]
