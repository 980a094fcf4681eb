"""A CSV/TSV/Parquet table of paths (+ labels) instead of an ImageFolder: no copying needed."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from featx.cli import main
from featx.embed.scan import scan_table
from featx.embed.table import read_table
from featx.engines.files import collect_files
from featx.errors import FeatXError
from featx.extract import extract

from .helpers import make_image_folder


@pytest.fixture
def loose(tmp_path):
    """The photos of an ImageFolder, moved into one flat folder with made-up names."""
    folder = make_image_folder(tmp_path / "folder", per_class=3)
    flat = tmp_path / "loose" / "pics"
    flat.mkdir(parents=True)
    rows = []
    for i, p in enumerate(sorted(folder.rglob("*.*"))):
        name = f"img{i:02d}{p.suffix}"
        shutil.copy(p, flat / name)
        rows.append({"path": f"pics/{name}", "label": p.parent.name, "orig": p.relative_to(folder).as_posix()})
    return folder, tmp_path / "loose", rows


def test_csv_listing_gives_the_same_embeddings_as_the_folder(loose, lite0, tmp_path):
    folder, base, rows = loose
    rows = rows[::-1]  # the table's order, not sorted order, is kept
    pd.DataFrame(rows).to_csv(base / "list.csv", index=False)
    ref = extract(folder, lite0, out=tmp_path / "ref.parquet", device="cpu").table
    # --features last: compared with the lite0 fixture's embeddings (extract defaults to multi)
    r = CliRunner().invoke(main, ["extract", str(base / "list.csv"), "--features", "last", "--out",
                                  str(tmp_path / "t.parquet"), "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    t = read_table(tmp_path / "t.parquet")
    assert t.paths == [row["path"] for row in rows] and t.labels == [row["label"] for row in rows]
    i = {p: n for n, p in enumerate(ref.paths)}
    np.testing.assert_array_equal(t.X, ref.X[[i[row["orig"]] for row in rows]])
    assert t.meta["root"] == str(base.resolve()) and t.meta["classes"] == ["cat", "thing"]


def test_parquet_listing_with_absolute_paths_and_no_labels(loose, lite0, tmp_path, monkeypatch):
    _, base, rows = loose
    listing = tmp_path / "elsewhere" / "abs.parquet"
    listing.parent.mkdir()
    pd.DataFrame({"path": [str(base / r["path"]) for r in rows]}).to_parquet(listing)
    monkeypatch.chdir(tmp_path)
    r = extract(listing, lite0, device="cpu")
    assert r.out == tmp_path / "abs.featx.parquet"  # named after the table
    assert r.table.paths == [str(base / row["path"]) for row in rows]
    assert set(r.table.labels) == {None} and not r.table.meta["classes"]


def test_rows_that_cannot_be_read_are_listed_with_their_row(loose, lite0, tmp_path):
    _, base, rows = loose
    (base / "pics" / "sub").mkdir()
    listing = [{"path": rows[0]["path"], "label": "cat"}, {"path": "pics/missing.jpg", "label": "cat"},
               {"path": "", "label": "cat"}, {"path": "foo://x.jpg", "label": "cat"},
               {"path": "pics/sub", "label": "cat"}, {"path": rows[1]["path"], "label": "thing"}]
    pd.DataFrame(listing).to_csv(base / "l.tsv", sep="\t", index=False)
    found = scan_table(base / "l.tsv")
    assert [i.path for i in found.items] == [rows[0]["path"], rows[1]["path"]]
    assert found.skipped == [("pics/missing.jpg", "row 2: no such file"), ("l.tsv row 3", "row 3: empty path"),
                             ("foo://x.jpg", "row 4: unknown URL protocol 'foo' (fsspec has no "
                              "filesystem for foo://)"),
                             ("pics/sub", "row 5: not a file")]
    r = extract(base / "l.tsv", lite0, out=tmp_path / "t.parquet", device="cpu")
    assert len(r.table) == 2
    assert len(json.loads(r.report.read_text())["skipped"]) == 4


def test_bad_listings_are_clear_errors(tmp_path):
    (tmp_path / "nopath.csv").write_text("file,label\na.jpg,cat\n")
    with pytest.raises(FeatXError, match=r"no .path. column.*file, label"):
        scan_table(tmp_path / "nopath.csv")
    make_image_folder(tmp_path / "d", per_class=1)
    (tmp_path / "half.csv").write_text("path,label\nd/cat/cat_0.jpg,cat\nd/thing/thing_0.jpg,\n")
    with pytest.raises(FeatXError, match="some rows have a label and some do not"):
        scan_table(tmp_path / "half.csv")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(FeatXError, match="cannot read the table"):
        scan_table(tmp_path / "bad.parquet")
    (tmp_path / "empty.csv").write_text("path\nnope.jpg\n")
    with pytest.raises(FeatXError, match=r"no images found.*no such file"):
        extract(tmp_path / "empty.csv", write=False)


def test_a_featx_table_lists_its_images_again(image_folder, lite0, tmp_path):
    """Paths of an embeddings table are relative to the data root it records, not to the table."""
    first = extract(image_folder, lite0, out=tmp_path / "out" / "feats.parquet", device="cpu")
    again = scan_table(first.out)
    assert again.root == image_folder.resolve()
    assert [(i.path, i.label) for i in again.items] == list(zip(first.table.paths, first.table.labels, strict=True))
    files, labels, skipped = collect_files([first.out])
    assert labels == first.table.labels
    assert files == [str(image_folder.resolve() / p) for p in first.table.paths] and not skipped


def test_ray_engine_reads_the_same_listing(loose, lite0, tmp_path):
    ray = pytest.importorskip("ray")
    _, base, rows = loose
    # relative and absolute paths and file:// URLs mixed: both engines open them alike
    paths = [[r["path"], str(base / r["path"]), "file://" + str(base / r["path"])][n % 3]
             for n, r in enumerate(rows)]
    pd.DataFrame({"path": paths, "label": [r["label"] for r in rows]}).to_parquet(base / "l.parquet")
    loc = extract(base / "l.parquet", lite0, out=tmp_path / "loc.parquet", store=tmp_path / "s1", device="cpu")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rr = extract(base / "l.parquet", lite0, out=tmp_path / "ray.parquet", store=tmp_path / "s2",
                     device="cpu", engine="ray")
    finally:
        ray.shutdown()
    assert rr.stats.embedded == len(rows) and rr.table.paths == loc.table.paths == paths
    assert rr.table.labels == loc.table.labels
    np.testing.assert_allclose(rr.table.X, loc.table.X, rtol=1e-5, atol=1e-6)


def test_evaluate_reads_a_labelled_listing(loose, lite0, tmp_path):
    """evaluate takes the same CSV as extract: same metrics as on the folder, thumbnails found."""
    from featx.evaluate import evaluate
    from featx.extract import extract as extract_folder
    from featx.heads.fit import fit_head
    from featx.heads.headfile import save_head

    folder, base, rows = loose
    pd.DataFrame(rows).to_csv(base / "list.csv", index=False)
    t = extract_folder(folder, lite0, device="cpu", write=False).table
    pipe, rep = fit_head(t.X, t.labels, C=1.0)
    head = save_head(tmp_path / "head.featx", pipe, rep["classes"], lite0, rep)
    on_folder = evaluate(head, folder, out_dir=tmp_path / "a", device="cpu")
    on_table = evaluate(head, base / "list.csv", out_dir=tmp_path / "b", device="cpu")
    assert on_table.metrics["accuracy"] == on_folder.metrics["accuracy"]
    assert on_table.metrics["n"] == on_folder.metrics["n"] == len(rows)
    preds = pd.read_csv(tmp_path / "b" / "predictions.csv")
    assert sorted(preds["path"]) == sorted(str((base / r["path"]).resolve()) for r in rows)
    assert "<img" in (tmp_path / "b" / "report.html").read_text()


def test_evaluate_cli_takes_a_listing_and_refuses_one_without_labels(loose, lite0, tmp_path, monkeypatch):
    from featx.heads.fit import fit_head
    from featx.heads.headfile import save_head

    folder, base, rows = loose
    pd.DataFrame(rows).to_csv(base / "list.csv", index=False)
    pd.DataFrame({"path": [r["path"] for r in rows]}).to_csv(base / "nolabels.csv", index=False)
    t = extract(folder, lite0, device="cpu", write=False).table
    pipe, rep = fit_head(t.X, t.labels, C=1.0)
    head = save_head(tmp_path / "head.featx", pipe, rep["classes"], lite0, rep)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["evaluate", str(head), str(base / "list.csv"), "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "list.eval" / "metrics.json").read_text())["n"] == len(rows)
    r = CliRunner().invoke(main, ["evaluate", str(head), str(base / "nolabels.csv"), "--device", "cpu", "-q"])
    assert r.exit_code == 1 and "needs labelled images" in r.output and "nolabels.csv" in r.output
