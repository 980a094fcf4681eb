"""Fine-tuning on hostile input: unreadable images, moved or changed data, tampered run directories.

Real image trees in tmp, real runs kept tiny (64 px, linear layer only, 1 epoch)
so the file stays at a couple of minutes of CPU time. Every tampered-run test
fails before any training, so they share one finished run, each on its own copy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from featx.cli import main
from featx.errors import FeatXError
from featx.finetune import finetune

from .helpers import make_image_folder

TINY = {"input_size": 64, "batch_size": 4, "epochs": 1, "unfreeze": 0, "lp_C": 1.0, "device": "cpu"}
BAD = {"cat/empty.jpg": "empty file", "thing/text.png": "not an image"}  # path -> reason fragment


def add_bad_files(root):
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "thing" / "text.png").write_text("hello, I am text, not a PNG")
    return root


def all_bad_folder(root):
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        (root / cls / "a.jpg").write_bytes(b"")
        (root / cls / "b.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return add_bad_files(make_image_folder(tmp_path_factory.mktemp("hostile") / "data"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished run on 8 photos + 2 unreadable files; patience=0 must mean 'never stop early'."""
    out = tmp_path_factory.mktemp("runs") / "ft"
    return finetune(data, out=out, val_fraction=0.25, patience=0, export=False, **TINY)


def copy_run(run, tmp_path):
    return shutil.copytree(run.run_dir, tmp_path / "run")


# ---- no usable images ------------------------------------------------------------------------

def test_every_file_unreadable_is_an_error_before_training(tmp_path):
    bad = all_bad_folder(tmp_path / "bad")
    with pytest.raises(FeatXError, match=r"no usable training image: 4 training files cannot be used: "
                                         r".*a\.jpg \(empty file"):
        finetune(bad, out=tmp_path / "run", **TINY)
    assert not (tmp_path / "run").exists()  # nothing written: the same command works once fixed


def test_a_class_without_a_readable_image_is_an_error(tmp_path):
    data = make_image_folder(tmp_path / "data")
    for f in (data / "thing").iterdir():
        f.write_bytes(b"")
    with pytest.raises(FeatXError, match="no readable training image of class thing"):
        finetune(data, out=tmp_path / "run", lp_init=False, **TINY)


def test_a_given_validation_folder_without_a_readable_image_is_an_error(data, tmp_path):
    val = tmp_path / "val"
    for cls in ("cat", "thing"):
        (val / cls).mkdir(parents=True)
        (val / cls / "x.jpg").write_bytes(b"")
    with pytest.raises(FeatXError, match="no usable validation image"):
        finetune(data, val=val, out=tmp_path / "run", **TINY)


def test_cli_refuses_unreadable_data_with_one_line(tmp_path):
    bad = all_bad_folder(tmp_path / "bad")
    r = CliRunner().invoke(main, ["finetune", str(bad), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert r.exit_code == 1, r.output
    assert r.output.startswith("error: no usable training image") and "Traceback" not in r.output


# ---- skipped files are reported ----------------------------------------------------------------

def test_skipped_files_are_listed_in_the_result_and_the_run_files(run, data):
    assert len(run.history) == 1 and not run.stopped_early  # patience=0: never stop (it trained 0 epochs)
    skipped = dict(run.skipped)
    assert set(skipped) == {str(data / p) for p in BAD}
    for p, why in BAD.items():
        assert why in skipped[str(data / p)]
    s = run.summary
    assert s["train_images"] + s["val_images"] == 8
    assert {d["path"] for d in s["skipped"]} == set(skipped)
    on_disk = json.loads((run.run_dir / "summary.json").read_text())
    assert on_disk["skipped"] == s["skipped"]
    status = json.loads((run.run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["skipped"] == 2 and len(status["skipped_files"]) == 2
    split = json.loads((run.run_dir / "split.json").read_text())
    assert {d["path"] for d in split["skipped"]} == set(skipped)
    assert len(split["train"]["keys"]) == len(split["train"]["paths"])  # content keys for --resume


def test_cli_prints_how_many_files_were_skipped_and_which(data, tmp_path):
    r = CliRunner().invoke(main, [
        "finetune", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--input-size", "64",
        "--batch-size", "4", "--unfreeze", "0", "--lp-C", "1.0", "--val-fraction", "0.25", "--patience", "0",
        "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "skipped 2 unreadable files (all listed in" in out
    for p in BAD:
        assert f"{data / p}: " in out
    assert "1 epoch on 6 images, 2 classes" in out  # not "1 epochs" (6 train + 2 val usable)
    assert "validation: 2 images" in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["patience"] == 0  # the same value the Python API takes for "never stop"


# ---- resume: the data must be the run's ----------------------------------------------------------

def test_resume_after_the_data_moved_is_an_error_and_root_finds_it(tmp_path):
    data = make_image_folder(tmp_path / "data")
    first = finetune(data, out=tmp_path / "run", val_fraction=0.25, export=False, **TINY)
    moved = tmp_path / "elsewhere"
    shutil.move(data, moved)
    with pytest.raises(FeatXError, match=r"data is gone from .*data \(none of its 8 files.*--root NEW_DIR"):
        finetune(resume=first.run_dir, epochs=2, device="cpu", export=False)
    with pytest.raises(FeatXError, match="only applies with --resume"):
        finetune(data, root=moved, out=tmp_path / "other", **TINY)
    again = finetune(resume=first.run_dir, root=moved, epochs=2, device="cpu", export=False)
    assert [h["epoch"] for h in again.history] == [1, 2]
    assert again.history[0] == first.history[0]
    split = json.loads((first.run_dir / "split.json").read_text())
    assert split["train"]["root"] == str(moved)  # named once, found again on the next --resume


def test_resume_refuses_changed_or_missing_files(run, data, tmp_path):
    d = copy_run(run, tmp_path)
    changed = shutil.copytree(data, tmp_path / "changed")
    a, b = sorted((changed / "cat").glob("cat_*"))[:2]
    a.write_bytes(b.read_bytes())  # same name, other picture
    with pytest.raises(FeatXError, match=r"changed since the run started: 1 of 8 files .*cat_0\.jpg \(changed\)"):
        finetune(resume=d, root=changed, epochs=2, device="cpu", export=False)
    b.unlink()
    with pytest.raises(FeatXError, match=r"2 of 8 files .*\(missing\)"):
        finetune(resume=d, root=changed, epochs=2, device="cpu", export=False)


def test_an_edited_manifest_root_cannot_redirect_the_run(run, data, tmp_path):
    d = copy_run(run, tmp_path)
    other = tmp_path / "other"
    make_image_folder(other, per_class=5)  # same layout and names, other pictures (different crops)
    for i in range(4):
        shutil.copy(other / "cat" / "cat_4.jpg", other / "cat" / f"cat_{i}.{['jpg', 'png', 'webp', 'JPEG'][i]}")
    split = json.loads((d / "split.json").read_text())
    split["train"]["root"] = split["val"]["root"] = str(other)
    (d / "split.json").write_text(json.dumps(split))
    with pytest.raises(FeatXError, match="changed since the run started"):
        finetune(resume=d, epochs=2, device="cpu", export=False)
    split["train"].pop("keys")  # without content keys there is nothing to check against: --root is required
    (d / "split.json").write_text(json.dumps(split))
    with pytest.raises(FeatXError, match="Pass --root DIR"):
        finetune(resume=d, epochs=2, device="cpu", export=False)


# ---- resume: a tampered run directory is a clear error -------------------------------------------

def _edit_config(d, fn):
    saved = json.loads((d / "config.json").read_text())
    fn(saved)
    (d / "config.json").write_text(json.dumps(saved))


@pytest.mark.parametrize("tamper, message", [
    (lambda d: (d / "config.json").write_text("{not json"), "config.json: the run's config is not valid JSON"),
    (lambda d: _edit_config(d, lambda s: s["config"].update(epochs="ten")), "epochs must be int, got 'ten'"),
    (lambda d: _edit_config(d, lambda s: s["config"].update(lr=-1.0)), "config.json: learning rates must be > 0"),
    (lambda d: _edit_config(d, lambda s: s["config"].update(shell="rm -rf")), r"unknown options \['shell'\]"),
    (lambda d: _edit_config(d, lambda s: s.update(featx_finetune=99)), "featx_finetune=99"),
    (lambda d: _edit_config(d, lambda s: s.update(config=[1, 2])), "'config' is not an object"),
    (lambda d: (d / "status.json").write_bytes(b"\x00\xff"), "status.json: the run's status is not valid JSON"),
    (lambda d: (d / "split.json").write_text('{"train": {"root": "/", "paths": ["a"], "labels": [7], '
                                              '"classes": ["a", "b"]}}'), "split.json is damaged"),
    (lambda d: (d / "last.pt").write_bytes(b"garbage" * 100), "last.pt: unreadable checkpoint"),
    (lambda d: torch.save({"epoch": 1}, d / "last.pt"), r"last.pt: not a checkpoint .*no model"),
    (lambda d: torch.save(dict(torch.load(d / "last.pt", weights_only=True), epoch=5), d / "last.pt"),
     "history does not list epochs 1..5"),
])
def test_tampered_run_files_give_a_clear_error(run, tmp_path, tamper, message):
    d = copy_run(run, tmp_path)
    tamper(d)
    with pytest.raises(FeatXError, match=message):
        finetune(resume=d, epochs=2, device="cpu", export=False)


def test_a_checkpoint_of_another_network_is_refused(run, tmp_path):
    d = copy_run(run, tmp_path)
    ckpt = torch.load(d / "last.pt", weights_only=True)
    ckpt["model"]["head.weight"] = torch.zeros(5, 3)  # another run's head shape
    torch.save(ckpt, d / "last.pt")
    with pytest.raises(FeatXError, match=r"last\.pt: the checkpoint does not fit this run"):
        finetune(resume=d, epochs=2, device="cpu", export=False)


def test_cli_tampered_config_is_one_error_line_not_a_traceback(run, tmp_path, featx_home):
    d = copy_run(run, tmp_path)
    _edit_config(d, lambda s: s["config"].update(batch_size=None))
    r = subprocess.run([sys.executable, "-m", "featx.cli", "finetune", "--resume", str(d), "--epochs", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "config.json: batch_size must be int, got None" in r.stderr
