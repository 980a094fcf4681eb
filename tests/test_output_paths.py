"""Every CSV and JSON file featx writes names images one way: absolute paths (issue 27 item 14).

Before, predict and evaluate wrote paths as given (relative to the folder the command ran in),
audit wrote them relative to the table's data root, duplicates/neighbors/suggest absolute. Run
from a folder with relative arguments, then read from another folder: every path must open.
Also predict's column: ``predicted`` (as evaluate's), ``label`` kept last for one release.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from .helpers import make_image_folder, run_cli

PATH_COLUMNS = ("path", "path_a", "path_b", "query", "copy")


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _paths(rows: list[dict]) -> list[str]:
    return [r[c] for r in rows for c in PATH_COLUMNS if r.get(c)]


def test_every_output_names_images_by_absolute_path(lite0, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    make_image_folder(Path("data"), per_class=6)
    make_image_folder(Path("pool"), per_class=3)
    run_cli("extract", "data", "--features", "last", "--out", "t.featx.parquet", "-q")
    run_cli("fit-head", "--embeddings", "t.featx.parquet", "--C", "1", "--out", "head.featx", "-q")
    run_cli("predict", "head.featx", "data", "--out", "pred.csv", "-q")
    run_cli("predict", "head.featx", "data", "--out", "pred.json", "-q")
    run_cli("evaluate", "head.featx", "data", "--out-dir", "ev", "-q")
    run_cli("audit", "t.featx.parquet", "--threshold", "0.99", "--out", "au", "-q")
    run_cli("neighbors", "--in", "t.featx.parquet", "pool", "-k", "2", "--out", "nb.csv", "-q")
    run_cli("duplicates", "t.featx.parquet", "--threshold", "0.5", "--out", "dup.csv", "-q")
    run_cli("suggest", "pool", "--labelled", "t.featx.parquet", "-n", "2", "--out", "s/next.csv", "-q")
    outputs = {name: _csv(work / name) for name in ("pred.csv", "ev/predictions.csv", "au/label_issues.csv",
                                                    "au/outliers.csv", "nb.csv", "dup.csv", "s/next.csv")}
    doc = json.loads((work / "pred.json").read_text())
    outputs["pred.json"] = doc["predictions"]
    monkeypatch.chdir(tmp_path)  # somewhere else: every path must still name its file
    for name, rows in outputs.items():
        paths = _paths(rows)
        assert paths, name
        for p in paths:
            assert os.path.isabs(p) and os.path.isfile(p), (name, p)
    data = {str((work / "data" / c / f).resolve()) for c in ("cat", "thing") for f in os.listdir(work / "data" / c)}
    assert {r["path"] for r in outputs["pred.csv"]} == data == {r["path"] for r in outputs["au/label_issues.csv"]}
    assert {r["path"] for r in outputs["ev/predictions.csv"]} == data
    # predict says `predicted`, as evaluate does; `label` (the old name) last, for one release
    pred = outputs["pred.csv"]
    header = (work / "pred.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["path", "predicted", "probability"] and header[-1] == "label"
    assert all(r["predicted"] == r["label"] and r["predicted"] in ("cat", "thing", "") for r in pred)
    assert all(r["predicted"] == r["label"] for r in doc["predictions"])
    # the JSON summary on stdout follows the same rule; the terminal lines show paths as given
    r = run_cli("predict", str(work / "head.featx"), str(work / "data"), "--json")
    assert {p["path"] for p in json.loads(r.output)["predictions"]} == data
