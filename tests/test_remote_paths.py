"""A listing may name its images by URL (fsspec): file:// and memory:// here, offline.

Object stores (s3://, gs://) and http(s):// go through the same code, with their own
fsspec package; what differs (a network error) is a failed row, tested with a store
that refuses every read.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from featx.embed.scan import scan_table
from featx.embed.statcache import stat_of
from featx.errors import FeatXError, MissingDependencyError
from featx.extract import extract

from .helpers import make_image_folder

fsspec = pytest.importorskip("fsspec")


@pytest.fixture
def data(tmp_path, lite0):
    """An ImageFolder and its embeddings by relative path (the reference every URL must match)."""
    folder = make_image_folder(tmp_path / "folder", per_class=2)
    ref = extract(folder, lite0, device="cpu", write=False).table
    return folder, {p: ref.X[i] for i, p in enumerate(ref.paths)}, dict(zip(ref.paths, ref.labels, strict=True))


@pytest.fixture
def memfs(tmp_path):
    """fsspec's in-memory filesystem, under a folder of this test's own; emptied afterwards."""
    fs = fsspec.filesystem("memory")
    base = f"/featx-{tmp_path.name}"
    yield fs, base
    if fs.exists(base):
        fs.rm(base, recursive=True)


def _file_url(path) -> str:
    return "file://" + str(path.resolve())


def _embeddings_match(table, expected: dict, rel_of) -> None:
    for p, x in zip(table.paths, table.X, strict=True):
        np.testing.assert_array_equal(x, expected[rel_of(p)], err_msg=p)


def test_file_urls_give_the_same_embeddings_as_local_paths(data, lite0, tmp_path):
    folder, emb, labels = data
    rels = list(emb)
    urls = [_file_url(folder / r) for r in rels]
    pd.DataFrame({"path": urls, "label": [labels[r] for r in rels]}).to_csv(tmp_path / "l.csv", index=False)
    r = extract(tmp_path / "l.csv", lite0, out=tmp_path / "t.parquet", device="cpu")
    assert r.table.paths == urls  # the table keeps the URL as the row's path
    assert r.table.labels == [labels[p] for p in rels] and r.table.meta["classes"] == ["cat", "thing"]
    _embeddings_match(r.table, emb, lambda u: os.path.relpath(u[len("file://"):], folder))


def test_memory_urls_are_read_through_fsspec(data, lite0, tmp_path, memfs):
    folder, emb, _ = data
    fs, base = memfs
    for rel in emb:
        fs.pipe(f"{base}/{rel}", (folder / rel).read_bytes())
    urls = [f"memory://{base}/{rel}" for rel in emb]
    pd.DataFrame({"path": urls}).to_parquet(tmp_path / "l.parquet")
    r = extract(tmp_path / "l.parquet", lite0, out=tmp_path / "t.parquet", device="cpu")
    assert r.table.paths == urls and r.stats.failures == []
    _embeddings_match(r.table, emb, lambda u: u.split(base + "/", 1)[1])
    from featx.plot import plot_embeddings

    # the map's thumbnails are read from the URLs the table keeps
    assert plot_embeddings(r.out, tmp_path / "map", method="pca").thumbnails == len(urls)


def test_a_listing_mixes_local_paths_and_urls_and_a_missing_object_is_one_failed_row(data, lite0, tmp_path,
                                                                                     memfs):
    folder, emb, labels = data
    fs, base = memfs
    rels = list(emb)
    fs.pipe(f"{base}/{rels[2]}", (folder / rels[2]).read_bytes())
    missing = f"memory://{base}/nowhere/gone.jpg"
    paths = [f"folder/{rels[0]}", _file_url(folder / rels[1]), f"memory://{base}/{rels[2]}", missing,
             str(folder / rels[3])]
    pd.DataFrame({"path": paths, "label": [*(labels[r] for r in rels[:3]), "cat", labels[rels[3]]]}
                 ).to_csv(tmp_path / "mixed.csv", index=False)
    r = extract(tmp_path / "mixed.csv", lite0, out=tmp_path / "t.parquet", device="cpu")
    assert r.table.paths == [p for p in paths if p != missing]
    assert r.stats.failures == [(missing, "no such file or object")]
    np.testing.assert_array_equal(r.table.X, np.stack([emb[rel] for rel in rels[:4]]))
    report = json.loads(r.report.read_text())
    assert report["failures"] == [{"path": missing, "reason": "no such file or object"}]


def test_a_store_that_fails_to_answer_is_a_failed_row_not_a_crashed_run(data, lite0, tmp_path):
    """Cloud clients raise their own error types (not OSError): each is one failed row."""
    from fsspec.implementations.memory import MemoryFileSystem

    class Unreachable(MemoryFileSystem):  # a store whose every read fails, as over a dead network
        protocol = "unreachable"

        def info(self, path, **kwargs):
            raise RuntimeError("503 Slow Down")

    fsspec.register_implementation("unreachable", Unreachable, clobber=True)
    folder, emb, _ = data
    rel = next(iter(emb))
    pd.DataFrame({"path": [rel, "unreachable://bucket/a.jpg"]}).to_csv(folder / "l.csv", index=False)
    r = extract(folder / "l.csv", lite0, out=tmp_path / "t.parquet", device="cpu")
    assert r.table.paths == [rel]
    assert r.stats.failures == [("unreachable://bucket/a.jpg", "cannot read: RuntimeError: 503 Slow Down")]


def test_url_objects_keep_the_file_size_limits(memfs):
    """Refused from the object's metadata, before a byte of it is downloaded."""
    from featx.embed.remote import read_url
    from featx.errors import ImageError

    fs, base = memfs
    fs.pipe(f"{base}/big.jpg", b"x" * 11)
    fs.pipe(f"{base}/empty.jpg", b"")
    with pytest.raises(ImageError, match=r"big\.jpg: file too large \(11 bytes > 10\)"):
        read_url(f"memory://{base}/big.jpg", max_bytes=10)
    with pytest.raises(ImageError, match=r"empty\.jpg: empty file"):
        read_url(f"memory://{base}/empty.jpg", max_bytes=10)
    with pytest.raises(ImageError, match="is a directory"):
        read_url(f"memory://{base}", max_bytes=10)
    assert read_url(f"memory://{base}/big.jpg", max_bytes=11) == b"x" * 11


def test_an_unknown_protocol_is_a_skipped_row_naming_it(data, tmp_path):
    folder, emb, _ = data
    rel = next(iter(emb))
    pd.DataFrame({"path": [rel, "foo://x.jpg"]}).to_csv(folder / "l.csv", index=False)
    found = scan_table(folder / "l.csv")
    assert [i.path for i in found.items] == [rel]
    assert found.skipped == [("foo://x.jpg", "row 2: unknown URL protocol 'foo' (fsspec has no filesystem "
                                             "for foo://)")]
    (tmp_path / "only.csv").write_text("path\nfoo://x.jpg\n")
    with pytest.raises(FeatXError, match=r"no images found.*unknown URL protocol 'foo'"):
        extract(tmp_path / "only.csv", write=False)


def test_a_missing_protocol_package_stops_the_scan_naming_it(tmp_path):
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here: gs:// URLs can be read")
    (tmp_path / "l.csv").write_text("path\nlocal.jpg\ngs://bucket/a.jpg\n")
    with pytest.raises(MissingDependencyError, match=r"l\.csv: row 2 is a URL \(gs://bucket/a\.jpg\).*gcsfs"):
        scan_table(tmp_path / "l.csv")


def test_without_fsspec_a_url_listing_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "l.csv").write_text("path\nfile:///a.jpg\n")
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if it were not installed: import fails
    with pytest.raises(MissingDependencyError, match=r"row 1 is a URL.*fsspec.*'remote' extra"):
        scan_table(tmp_path / "l.csv")


def test_urls_are_not_joined_to_the_root_and_have_no_stat(tmp_path, monkeypatch):
    from featx.embed.scan import resolve_item_path

    assert resolve_item_path(tmp_path, "s3://bucket/a/b.jpg") == "s3://bucket/a/b.jpg"
    assert resolve_item_path(tmp_path, "a/b.jpg") == str(tmp_path / "a" / "b.jpg")
    assert resolve_item_path(tmp_path, "/abs/b.jpg") == "/abs/b.jpg"
    # a local file that a URL's text also names ("memory:" folder in the cwd): still no stat
    monkeypatch.chdir(tmp_path)
    (tmp_path / "memory:" / "x").mkdir(parents=True)
    (tmp_path / "memory:" / "x" / "a.jpg").write_bytes(b"not the object")
    assert stat_of("memory:/x/a.jpg") is not None and stat_of("memory://x/a.jpg") is None


def test_a_url_is_read_again_on_every_run(data, lite0, tmp_path, memfs):
    """No stat to trust: a changed object gives its new embedding on the next run."""
    folder, emb, _ = data
    fs, base = memfs
    a, b = list(emb)[:2]
    url = f"memory://{base}/img.bin"
    pd.DataFrame({"path": [url]}).to_csv(tmp_path / "l.csv", index=False)
    fs.pipe(f"{base}/img.bin", (folder / a).read_bytes())
    first = extract(tmp_path / "l.csv", lite0, out=tmp_path / "1.parquet", device="cpu")
    fs.pipe(f"{base}/img.bin", (folder / b).read_bytes())
    second = extract(tmp_path / "l.csv", lite0, out=tmp_path / "2.parquet", device="cpu")
    np.testing.assert_array_equal(first.table.X[0], emb[a])
    np.testing.assert_array_equal(second.table.X[0], emb[b])


def test_predict_and_evaluate_write_the_urls(data, lite0, tmp_path, memfs):
    from featx.evaluate import evaluate
    from featx.heads.fit import fit_head
    from featx.heads.headfile import save_head
    from featx.predict import predict, write_predictions

    folder, emb, labels = data
    fs, base = memfs
    rels = list(emb)
    for rel in rels[::2]:
        fs.pipe(f"{base}/{rel}", (folder / rel).read_bytes())
    urls = [f"memory://{base}/{r}" if n % 2 == 0 else _file_url(folder / r) for n, r in enumerate(rels)]
    pd.DataFrame({"path": urls, "label": [labels[r] for r in rels]}).to_csv(tmp_path / "l.csv", index=False)
    X = np.stack([emb[r] for r in rels])
    pipe, rep = fit_head(X, [labels[r] for r in rels], C=1.0)
    head = save_head(tmp_path / "head.featx", pipe, rep["classes"], lite0, rep)

    res = predict(head, [tmp_path / "l.csv"], device="cpu")
    assert res.files == urls and res.true_labels == [labels[r] for r in rels]
    write_predictions(res, tmp_path / "p.csv")
    assert pd.read_csv(tmp_path / "p.csv")["path"].tolist() == urls

    ev = evaluate(head, tmp_path / "l.csv", out_dir=tmp_path / "ev", device="cpu")
    assert ev.metrics["n"] == len(rels) and ev.metrics["failed"] == 0
    assert sorted(pd.read_csv(tmp_path / "ev" / "predictions.csv")["path"]) == sorted(urls)
    page = (tmp_path / "ev" / "report.html").read_text()
    assert all(f"href='{u}'" in page for u in urls)  # linked as listed, not relative to the page
    from featx.embed.images import thumbnail

    assert thumbnail(urls[0], 32).shape[2] == 3  # the top-losses grid reads URLs too


def test_cli_extracts_a_file_url_listing_in_a_real_process(data, tmp_path):
    folder, emb, _ = data
    urls = [_file_url(folder / r) for r in emb]
    pd.DataFrame({"path": urls}).to_csv(tmp_path / "list.csv", index=False)
    # --features last: compared with the lite0 fixture's embeddings (extract defaults to multi)
    run = subprocess.run([sys.executable, "-m", "featx.cli", "extract", str(tmp_path / "list.csv"),
                          "--features", "last", "--out", str(tmp_path / "t.parquet"), "--device", "cpu", "-q"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    from featx.embed.table import read_table

    t = read_table(tmp_path / "t.parquet")
    assert t.paths == urls
    _embeddings_match(t, emb, lambda u: os.path.relpath(u[len("file://"):], folder))
