"""`featx compare` under hostile input: folders that cannot make a comparison say why in one line,
and unreadable files are left out and named rather than breaking a run.

Real photos, the real default card (frozen probes at a small input size), real files.
"""

from __future__ import annotations

import json
import shutil

from .helpers import make_image_folder, run_cli

SMALL = ["--methods", "frozen", "--input-size", "64", "--device", "cpu", "--epochs", "1"]


def test_folders_that_cannot_make_a_comparison_are_one_line(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=3)
    one = tmp_path / "one"
    shutil.copytree(data / "cat", one / "x")
    r = run_cli("compare", str(one), "--per-class", "1", "--out", str(tmp_path / "r1"), *SMALL, ok=False)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert "need at least 2 classes" in r.output, r.output
    r = run_cli("compare", str(data), "--test", str(one), "--per-class", "1", "--out", str(tmp_path / "r2"),
                *SMALL, ok=False)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert "are not among the training classes" in r.output, r.output


def test_unreadable_training_files_are_left_out_and_named(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4)
    test = make_image_folder(tmp_path / "test", per_class=2)
    (data / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (data / "thing" / "empty.png").write_bytes(b"")
    out = tmp_path / "report"
    run_cli("compare", str(data), "--test", str(test), "--per-class", "all", "--out", str(out), *SMALL)
    doc = json.loads((out / "compare.json").read_text())
    notes = " ".join(doc.get("notes", []))
    assert "2 unreadable files left out of every method" in notes and "broken.jpg" in notes, notes
    (row,) = [r for r in doc["rows"] if r["method"] == "frozen"]
    assert row["train_images"] == 8 and 0.0 <= row["accuracy"] <= 1.0


def test_a_size_is_drawn_from_the_readable_files(tmp_path):
    """A class whose drawn images were all unreadable used to vanish from the row ("a head needs
    at least 2 classes"); each size is drawn from the readable files."""
    data = make_image_folder(tmp_path / "data", per_class=3)
    test = make_image_folder(tmp_path / "test", per_class=2)
    for cls in ("cat", "thing"):
        for j in range(6):  # twice the readable images: a draw of 1 a class hits one most of the time
            (data / cls / f"a{j}-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "report"
    for seed in ("0", "1", "2"):
        run_cli("compare", str(data), "--test", str(test), "--per-class", "1", "--seed", seed,
                "--out", str(out / seed), *SMALL)
        (row,) = [r for r in json.loads((out / seed / "compare.json").read_text())["rows"]
                  if r["method"] == "frozen"]
        assert row["train_images"] == 2, row
