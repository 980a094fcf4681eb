"""Hostile and unlucky inputs: empty images, listings with columns of the wrong type, cells that
a spreadsheet would run as formulas, outputs that are not featx's, a FEATX_HOME that cannot be.

Real backbone, real photos, real files.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from featx.errors import FeatXError, ImageError


@pytest.mark.parametrize("images", [
    np.zeros((4, 0, 0), np.uint8),
    np.zeros((2, 0, 5, 3), np.uint8),
    [np.zeros((0, 0, 3), np.uint8)] * 2,
    [np.zeros((7, 0), np.uint8)] * 2,
    [Image.new("RGB", (0, 4))] * 2,
], ids=["4x0x0", "2x0x5x3", "list-0x0x3", "list-7x0", "pil-0x4"])
def test_zero_size_images_are_named_not_divided_by(lite0, images):
    from featx.estimators import FeatXClassifier

    with pytest.raises(ImageError, match=r"empty image \(\d+x\d+ pixels\)"):
        FeatXClassifier(C=1.0).fit(images, ["a", "b"] * (len(images) // 2))


def test_resize_crop_refuses_an_empty_picture(lite0):
    from featx.embed.images import resize_crop

    with pytest.raises(ImageError, match="empty image"):
        resize_crop(Image.new("RGB", (5, 0)), lite0.preprocess)


# ---- listings with columns of the wrong type ---------------------------------------------------

def _listing(where, cols: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(cols), where)
    return where


@pytest.mark.parametrize("cols,why", [
    ({"path": [1, 2]}, "'path' column holds int64 values, not text"),
    ({"path": [{"a": "x.png"}, {"a": "y.png"}]}, "'path' column holds struct"),
    ({"path": ["a.png", "b.png"], "path_bytes": [1, 2]}, "'path_bytes' column holds int64 values, not bytes"),
    ({"path": ["a.png", "b.png"], "label": [["x"], ["y"]]}, "'label' column holds list"),
], ids=["path-int", "path-struct", "path_bytes-int", "label-list"])
def test_listing_columns_of_the_wrong_type_are_one_line(tmp_path, cols, why):
    from featx.embed.scan import scan_table

    from .helpers import run_cli

    listing = _listing(tmp_path / "list.parquet", cols)
    with pytest.raises(FeatXError, match=why):
        scan_table(listing)
    r = run_cli("extract", str(listing), "--out", str(tmp_path / "t.featx.parquet"), ok=False)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit) and why.split(" values")[0] in r.output


def test_a_table_whose_path_column_is_not_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from featx.embed import arrow
    from featx.embed.table import read_table

    t = pa.table({"path": [1, 2], "key": ["k1", "k2"],
                  "embedding": arrow.embeddings(np.ones((2, 4), np.float32))})
    pq.write_table(t, tmp_path / "t.featx.parquet")
    with pytest.raises(FeatXError, match="'path' column holds int64"):
        read_table(tmp_path / "t.featx.parquet")


# ---- spreadsheet formulas in CSV outputs -------------------------------------------------------

FORMULA_CLASSES = ("=HYPERLINK(\"http://evil\",\"x\")", "@SUM(A1)")


@pytest.fixture(scope="module")
def formula_folder(tmp_path_factory, lite0):
    """Real photos in class folders (and under file names) a spreadsheet would run as formulas."""
    from .helpers import photos

    root = tmp_path_factory.mktemp("formulas")
    p = photos()
    for cls, names in zip(FORMULA_CLASSES, (("chelsea", "cat"), ("coffee", "rocket")), strict=True):
        (root / "data" / cls).mkdir(parents=True)
        for i in range(3):
            a = p[names[i % 2]][i * 10:, i * 10:]
            Image.fromarray(np.ascontiguousarray(a)).save(root / "data" / cls / f"+{i}-cmd.png")
    return root


def _cells(path) -> list[str]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return [c for row in csv.reader(f, delimiter="\t" if str(path).endswith(".tsv") else ",") for c in row]


def test_csv_outputs_neutralise_formula_cells(formula_folder):
    from .helpers import run_cli

    d = formula_folder
    run_cli("extract", str(d / "data"), "--out", str(d / "t.featx.parquet"), "-q")
    run_cli("fit-head", "--embeddings", str(d / "t.featx.parquet"), "--out", str(d / "h.joblib"), "--C", "1")
    run_cli("predict", str(d / "h.joblib"), str(d / "data"), "--out", str(d / "p.csv"), "-q")
    run_cli("predict", str(d / "h.joblib"), str(d / "data"), "--out", str(d / "p.tsv"), "-q")
    run_cli("evaluate", str(d / "h.joblib"), str(d / "data"), "--out-dir", str(d / "ev"), "-q")
    run_cli("duplicates", str(d / "t.featx.parquet"), "--threshold", "-1", "--out", str(d / "dup.csv"))
    run_cli("neighbors", str(d / "t.featx.parquet"), "--in", str(d / "t.featx.parquet"), "-k", "2",
            "--out", str(d / "nn.csv"))
    outputs = [d / "p.csv", d / "p.tsv", d / "ev" / "predictions.csv", d / "dup.csv", d / "nn.csv"]
    for out in outputs:
        cells = _cells(out)
        live = [c for c in cells if c and c[0] in "=+-@" and not _number(c)]
        assert not live, (out, live[:3])
        assert any(c.startswith("'=HYPERLINK") or c.startswith("'@SUM") for c in cells), out


def _number(c: str) -> bool:
    try:
        float(c)
    except ValueError:
        return False
    return True


def test_safe_cell_leaves_numbers_and_plain_text():
    from featx.csvout import safe_cell

    assert safe_cell("-0.250000") == "-0.250000"
    assert safe_cell("+1e3") == "+1e3"
    assert safe_cell("cat") == "cat" and safe_cell(3) == 3 and safe_cell(None) is None
    assert safe_cell("=1+1") == "'=1+1" and safe_cell("-cmd") == "'-cmd" and safe_cell("@x") == "'@x"
    assert safe_cell("\t=x") == "'\t=x"


# ---- a class of one image ----------------------------------------------------------------------

@pytest.mark.parametrize("head", ["linear-svm", "svm-rbf"])
def test_svm_heads_say_how_many_images_a_class_needs(tmp_path, head):
    from .helpers import make_image_folder, run_cli

    data = make_image_folder(tmp_path / "data", per_class=3)
    for extra in sorted((data / "thing").iterdir())[1:]:
        extra.unlink()  # one "thing" image left
    run_cli("extract", str(data), "--out", str(tmp_path / "t.featx.parquet"), "-q")
    for c in ("1", "auto"):
        r = run_cli("fit-head", "--embeddings", str(tmp_path / "t.featx.parquet"), "--head", head, "--C", c,
                    "--out", str(tmp_path / "h.joblib"), ok=False)
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
        assert f"the {head} head needs at least 2 images in every class" in r.output and "thing" in r.output
    assert not (tmp_path / "h.joblib").exists()
    run_cli("fit-head", "--embeddings", str(tmp_path / "t.featx.parquet"), "--head", "logreg", "--C", "1",
            "--out", str(tmp_path / "h.joblib"))
