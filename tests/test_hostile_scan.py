"""Hostile and unlucky folders for the scan: symlinks, unreadable folders, long paths, odd names.

Every tree is built in tmp by the test. A label comes from the path under the root as
written; whatever the scan leaves out is listed with its reason, never dropped silently.
"""

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from featx.cli import main
from featx.embed.scan import PATH_MAX, display_path, scan, sniff_image
from featx.embed.table import read_table
from featx.engines.files import collect_files
from featx.extract import extract
from featx.predict import predict, write_predictions

from .helpers import make_image_folder, unprivileged


def labelled(r):
    return {(i.path, i.label) for i in r.items}


def why(r, path):
    reasons = dict(r.skipped)
    assert path in reasons, (path, r.skipped)
    return reasons[path]


def two_classes(root, n=2):
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (16, 16), (40 * i, 100 if c == "cat" else 200, 7)).save(root / c / f"{c}{i}.png")
    return root


# ---- symlinks ---------------------------------------------------------------------------

def test_link_into_another_class_folder_does_not_relabel(tmp_path):
    root = two_classes(tmp_path / "data")
    os.symlink("../dog", root / "cat" / "more")  # ln -s ../dog data/cat/more
    r = scan(root)
    assert labelled(r) == {("cat/cat0.png", "cat"), ("cat/cat1.png", "cat"),
                           ("dog/dog0.png", "dog"), ("dog/dog1.png", "dog")}
    assert "class folder 'dog'" in why(r, "cat/more") and "--follow-symlinks" in why(r, "cat/more")
    # the real dog/ folder is never mistaken for a loop because a link reached it first
    assert not any(p.startswith("dog") for p, _ in r.skipped)


def test_follow_symlinks_labels_by_where_the_link_sits(tmp_path):
    root = two_classes(tmp_path / "data")
    os.symlink("../dog", root / "cat" / "more")
    r = scan(root, follow_symlinks=True)
    assert ("cat/more/dog0.png", "cat") in labelled(r)  # asked for: the link's place gives the label
    assert ("dog/dog0.png", "dog") in labelled(r) and not r.skipped


def test_file_link_into_another_class_is_skipped(tmp_path):
    root = two_classes(tmp_path / "data")
    os.symlink("../dog/dog0.png", root / "cat" / "sneaky.png")
    r = scan(root)
    assert "cat/sneaky.png" not in {i.path for i in r.items}
    assert "class folder 'dog'" in why(r, "cat/sneaky.png")


def test_links_outside_the_root_are_skipped_unless_asked(tmp_path):
    root = two_classes(tmp_path / "data")
    outside = two_classes(tmp_path / "elsewhere")
    os.symlink(outside / "dog", root / "cat" / "ext")          # a folder outside the root
    os.symlink(outside / "dog", root / "bird")                 # a whole class folder outside
    os.symlink(outside / "cat" / "cat0.png", root / "cat" / "x.png")  # a file outside
    r = scan(root)
    assert {i.path for i in r.items} == {"cat/cat0.png", "cat/cat1.png", "dog/dog0.png", "dog/dog1.png"}
    for p in ("cat/ext", "bird", "cat/x.png"):
        assert "outside the root" in why(r, p)
    assert r.classes == ["cat", "dog"]
    followed = scan(root, follow_symlinks=True)
    assert {("cat/ext/dog0.png", "cat"), ("bird/dog0.png", "bird"), ("cat/x.png", "cat")} <= labelled(followed)


def test_link_inside_its_own_class_is_followed(tmp_path):
    root = two_classes(tmp_path / "data")
    (root / "cat" / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(root / "cat" / "sub" / "s.png")
    os.symlink("sub", root / "cat" / "alias")
    os.symlink("cat0.png", root / "cat" / "copy.png")
    r = scan(root)
    assert {("cat/alias/s.png", "cat"), ("cat/copy.png", "cat"), ("cat/sub/s.png", "cat")} <= labelled(r)
    assert not r.skipped


def test_dangling_link_and_loop_are_named(tmp_path):
    root = two_classes(tmp_path / "data")
    os.symlink("gone.png", root / "cat" / "broken.png")
    os.symlink("..", root / "cat" / "up")  # back to the root: a loop even when following links
    for follow in (False, True):
        r = scan(root, follow_symlinks=follow)
        assert "dangling symlink" in why(r, "cat/broken.png")
        assert "loop" in why(r, "cat/up")
        assert len(r.items) == 4


# ---- folders that cannot be read, paths that are too long ------------------------------

SCAN_JSON = ("import json, sys; from featx.embed.scan import scan; r = scan(sys.argv[1]); "
             "print(json.dumps({'items': [[i.path, i.label] for i in r.items], 'skipped': r.skipped}))")


def test_unreadable_folders_are_listed_not_dropped(tmp_path):
    root = two_classes(tmp_path / "data")
    (root / "dog" / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(root / "dog" / "sub" / "s.png")
    (root / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(root / "bird" / "b.png")
    os.chmod(root / "bird", 0)         # a whole class folder
    os.chmod(root / "dog" / "sub", 0)  # a subfolder
    try:
        cmd = unprivileged([sys.executable, "-c", SCAN_JSON, str(root)])
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(root / "bird", 0o755)
        os.chmod(root / "dog" / "sub", 0o755)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert sorted(p for p, _ in got["items"]) == ["cat/cat0.png", "cat/cat1.png", "dog/dog0.png", "dog/dog1.png"]
    reasons = dict(got["skipped"])
    assert reasons["bird"].startswith("permission denied") and reasons["dog/sub"].startswith("permission denied")


def test_cli_counts_skipped_paths_of_an_unreadable_folder(tmp_path, lite0):
    root = make_image_folder(tmp_path / "data", per_class=2)
    (root / "thing" / "locked").mkdir()
    shutil.copy(root / "thing" / "thing_0.jpg", root / "thing" / "locked" / "x.jpg")
    os.chmod(root / "thing" / "locked", 0)
    out = tmp_path / "t.parquet"
    try:
        cmd = unprivileged([sys.executable, "-m", "featx.cli", "extract", str(root), "--out", str(out),
                            "--device", "cpu", "-q"])
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        os.chmod(root / "thing" / "locked", 0o755)
    assert p.returncode == 0, p.stderr
    assert "1 skipped (see report)" in p.stdout
    report = json.loads((tmp_path / "t.parquet.report.json").read_text())
    assert [s["path"] for s in report["skipped"]] == ["thing/locked"]
    assert "permission denied" in report["skipped"][0]["reason"]


def test_paths_longer_than_path_max_are_listed(tmp_path):
    root = two_classes(tmp_path / "data")
    # build cat/aaa.../aaa.../... deeper than PATH_MAX, one folder at a time through dir fds
    fd = os.open(root / "cat", os.O_RDONLY)
    depth, name = 0, "d" * 200
    try:
        while len(str(root / "cat")) + depth * (len(name) + 1) < PATH_MAX + 300:
            os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd, depth = nxt, depth + 1
        img = os.open("deep.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(img, _png())
        os.close(img)
    finally:
        os.close(fd)
    r = scan(root)
    assert len(r.items) == 4
    [(path, reason)] = r.skipped
    assert path.startswith("cat/ddd") and "too long" in reason and str(PATH_MAX) in reason


def _png() -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(b, "PNG")
    return b.getvalue()


# ---- files recognised by content ---------------------------------------------------------

def test_images_without_an_image_extension_are_found_by_content(image_folder, lite0, tmp_path):
    cat = image_folder / "cat"
    shutil.copy(cat / "cat_0.jpg", cat / "photo.jfif")
    shutil.copy(cat / "cat_0.jpg", cat / "IMG_0001")         # no extension at all
    shutil.copy(cat / "cat_1.png", cat / "export.bin")
    (cat / "notes.txt").write_text("BM is not a bitmap")
    (cat / "labels.csv").write_text("path,label\n")
    r = extract(image_folder, lite0, out=tmp_path / "t.parquet", device="cpu")
    got = set(r.table.paths)
    assert {"cat/photo.jfif", "cat/IMG_0001", "cat/export.bin"} <= got
    assert not {"cat/notes.txt", "cat/labels.csv"} & got
    idx = {p: i for i, p in enumerate(r.table.paths)}
    np.testing.assert_array_equal(r.table.X[idx["cat/IMG_0001"]], r.table.X[idx["cat/cat_0.jpg"]])
    report = json.loads(r.report.read_text())
    assert sorted(report["recognised_by_content"]) == ["cat/IMG_0001", "cat/export.bin", "cat/photo.jfif"]
    files, _, skipped = collect_files([cat / "photo.jfif", cat / "notes.txt"])
    assert files == [str(cat / "photo.jfif")] and skipped[0][0] == str(cat / "notes.txt")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"])
def test_sniff_knows_every_format_featx_decodes(fmt):
    b = io.BytesIO()
    Image.new("RGB", (8, 8)).save(b, fmt)
    assert sniff_image(b.getvalue()[:32]) == fmt
    assert sniff_image(b"BMW: not a bitmap at all") is None


# ---- names that are not UTF-8 ------------------------------------------------------------

def test_non_utf8_names_extract_predict_evaluate(image_folder, lite0, tmp_path):
    raw_file = b"cat/caf\xff\xfe.jpg"
    raw_class = b"d\xe9j\xe0"  # Latin-1 bytes of a class folder name
    base = os.fsencode(image_folder)
    shutil.copyfile(os.fsencode(image_folder / "cat" / "cat_0.jpg"), base + b"/" + raw_file)
    os.mkdir(base + b"/" + raw_class)
    shutil.copyfile(os.fsencode(image_folder / "thing" / "thing_0.jpg"), base + b"/" + raw_class + b"/x.jpg")
    out = tmp_path / "t.parquet"
    res = CliRunner().invoke(main, ["extract", str(image_folder), "--out", str(out), "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    # plain pandas / pyarrow read it: printable path, exact bytes beside it
    df = pd.read_parquet(out)
    row = df[df.path == "cat/caf\\xff\\xfe.jpg"].iloc[0]
    assert row.path_bytes == raw_file and row.label == "cat"
    assert set(df.label) == {"cat", "thing", "d\\xe9j\\xe0"}
    assert df.path_bytes.isna().sum() == len(df) - 2
    assert pq.read_table(out).num_rows == 10
    # featx gives the exact name back, and it opens
    t = read_table(out)
    name = os.fsdecode(raw_file)
    assert name in t.paths and (image_folder / name).read_bytes() == (image_folder / "cat" / "cat_0.jpg").read_bytes()
    assert t.keys[t.paths.index(name)] == t.keys[t.paths.index("cat/cat_0.jpg")]
    json.loads((tmp_path / "t.parquet.report.json").read_text(encoding="utf-8"))
    # predict writes every row, with the printable name
    res = CliRunner().invoke(main, ["fit-head", "-e", str(out), "--C", "1", "-o", str(tmp_path / "h.joblib")])
    assert res.exit_code == 0, res.output
    pr = predict(tmp_path / "h.joblib", [image_folder], device="cpu")
    rows = list(csv.DictReader(write_predictions(pr, tmp_path / "p.csv").open(encoding="utf-8")))
    assert len(rows) == 10 and display_path(str(image_folder / name)) in {r["path"] for r in rows}
    res = CliRunner().invoke(main, ["predict", str(tmp_path / "h.joblib"), str(image_folder)])
    assert res.exit_code == 0 and "caf\\xff\\xfe.jpg" in res.output, res.output
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "h.joblib"), str(image_folder),
                                    "--out-dir", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
