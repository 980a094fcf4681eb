"""Extraction end to end: table, cache hits/misses, bad files, resume, concurrency, CLI."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from featx.cli import main
from featx.embed.store import EmbeddingStore
from featx.embed.table import read_table
from featx.errors import DeviceError, FeatXError, StoreError
from featx.extract import extract

from .helpers import make_image_folder


def test_table_schema_and_separability(image_folder, lite0, tmp_path):
    r = extract(image_folder, lite0, out=tmp_path / "t.parquet", store=tmp_path / "s", device="cpu")
    t = pq.read_table(tmp_path / "t.parquet")  # plain pyarrow, no featx
    assert t.column_names == ["path", "label", "key", "embedding"]
    assert t.schema.field("embedding").type.list_size == 1280
    assert str(t.schema.field("embedding").type.value_type) == "float"
    assert t.num_rows == 8 and set(t.column("label").to_pylist()) == {"cat", "thing"}
    assert r.summary()["embedded"] == 8
    # a linear probe separates cats from things (leave-one-out)
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import LeaveOneOut, cross_val_score

    tab = read_table(tmp_path / "t.parquet")
    acc = cross_val_score(LogisticRegression(max_iter=1000), tab.X, tab.labels, cv=LeaveOneOut()).mean()
    assert acc >= 0.85, acc


def test_cache_hit_miss_and_invalidation(image_folder, lite0, tmp_path):
    kw = dict(store=tmp_path / "s", device="cpu")
    first = extract(image_folder, lite0, out=tmp_path / "a.parquet", **kw)
    assert first.stats.embedded == 8
    again = extract(image_folder, lite0, out=tmp_path / "b.parquet", **kw)
    assert again.stats.embedded == 0 and again.stats.cached == 8
    np.testing.assert_array_equal(read_table(tmp_path / "a.parquet").X, read_table(tmp_path / "b.parquet").X)
    # rename: free; edit: re-embedded
    os.rename(image_folder / "cat" / "cat_0.jpg", image_folder / "cat" / "renamed.jpg")
    img = Image.open(image_folder / "cat" / "cat_1.png").convert("RGB")
    Image.fromarray(255 - np.asarray(img)).save(image_folder / "cat" / "cat_1.png")
    third = extract(image_folder, lite0, out=tmp_path / "c.parquet", **kw)
    assert third.stats.embedded == 1 and third.stats.cached == 7
    assert "cat/renamed.jpg" in third.table.paths


def corrupt_folder(root):
    """Bad files beside good ones: each must be skipped with a reason."""
    bad = root / "cat"
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.png").write_text("this is not an image")
    good = io.BytesIO()
    Image.new("RGB", (400, 300), (200, 10, 10)).save(good, "JPEG")
    (bad / "truncated.jpg").write_bytes(good.getvalue()[:800])
    (bad / "dir.jpg").mkdir()
    return {"cat/empty.jpg", "cat/text.png", "cat/truncated.jpg"}


def test_bad_files_are_skipped_and_reported(image_folder, lite0, tmp_path):
    clean = extract(image_folder, lite0, out=tmp_path / "clean.parquet", store=tmp_path / "s1", device="cpu")
    bad = corrupt_folder(image_folder)
    r = extract(image_folder, lite0, out=tmp_path / "t.parquet", store=tmp_path / "s2", device="cpu")
    assert {p for p, _ in r.stats.failures} == bad
    report = json.loads(r.report.read_text())
    reasons = {f["path"]: f["reason"] for f in report["failures"]}
    assert "empty" in reasons["cat/empty.jpg"] and "not an image" in reasons["cat/text.png"]
    assert "truncated" in reasons["cat/truncated.jpg"]
    assert report["failed"] == 3 and report["embedded"] == 8
    # the good images' embeddings are byte-identical to a run without the bad files
    np.testing.assert_array_equal(r.table.X, clean.table.X)
    assert r.table.paths == clean.table.paths


def test_interrupted_run_resumes_without_redoing(image_folder, lite0, tmp_path):
    make_image_folder(image_folder, per_class=12)  # 24 images
    store = tmp_path / "s"
    calls = []

    def stop_after_two_batches(stage, done, total):
        if stage == "embed" and done >= 8:
            calls.append(done)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(image_folder, lite0, out=tmp_path / "x.parquet", store=store, device="cpu",
                batch_size=4, workers=1, progress=stop_after_two_batches)
    st = EmbeddingStore(lite0, store)
    saved = len(st.keys())
    assert saved >= 8  # what was embedded before Ctrl-C was flushed
    resumed = extract(image_folder, lite0, out=tmp_path / "r.parquet", store=store, device="cpu")
    assert resumed.stats.embedded == 24 - saved and resumed.stats.cached == saved
    full = extract(image_folder, lite0, out=tmp_path / "f.parquet", store=tmp_path / "fresh", device="cpu")
    assert resumed.table.keys == full.table.keys
    np.testing.assert_allclose(resumed.table.X, full.table.X, rtol=1e-5, atol=1e-6)


def _featx(*args, env=None):
    # the extract calls below pass --features last: they check the `lite0` fixture's store
    # (the card's last export), and `featx extract` defaults to multi features
    return [sys.executable, "-m", "featx.cli", *args]


@pytest.fixture
def many_images(tmp_path):
    import skimage.data

    src = skimage.data.chelsea()
    root = tmp_path / "many"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    for i in range(120):
        crop = np.array(src[i % 50: 250 + i % 50, (i * 3) % 150: 250 + (i * 3) % 150])
        crop[0, 0] = (i, 255 - i, 7)  # every file distinct, so 120 keys
        Image.fromarray(crop).save(root / "ab"[i % 2] / f"{i}.png")
    return root


@pytest.mark.parametrize("points", [pytest.param((2, 9, 17), id="fixed-points"),
                                    pytest.param(None, id="random-points", marks=pytest.mark.slow)])
def test_sigkill_at_several_points_then_resume(points, many_images, lite0, tmp_path, featx_home):
    """SIGKILL a real `featx extract` again and again; each rerun resumes, none recomputes."""
    import random

    if points is None:
        points = sorted(random.Random().sample(range(1, 28), 6))
    store = tmp_path / "s"
    env = {**os.environ, "FEATX_HOME": str(featx_home)}
    args = _featx("extract", "--features", "last", str(many_images), "--out", str(tmp_path / "k.parquet"), "--store", str(store),
                  "--batch-size", "4", "--shard-size", "4", "--workers", "1", "--device", "cpu", "-q")
    ns = store / lite0.fingerprint
    kept: dict[str, int] = {}
    for n in points:  # kill once the store holds n shards (4 images each; 30 in all)
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline and len(list(ns.glob("shard-*.parquet"))) < n and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        now = {p.name: p.stat().st_mtime_ns for p in ns.glob("shard-*.parquet")}
        assert all(now[k] == v for k, v in kept.items()), "a finished shard was rewritten"
        assert not list(ns.glob(".*featx-tmp"))
        kept = now
    n_before = len(EmbeddingStore(lite0, store).keys())
    assert n_before < 120, "the runs finished before they were killed; the test proves nothing"
    done = subprocess.run([*args, "--json"], env=env, capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout)
    assert summary["embedded"] == 120 - n_before and summary["cached"] == n_before
    after = {p.name: p.stat().st_mtime_ns for p in ns.glob("shard-*.parquet")}
    assert all(after[k] == v for k, v in kept.items())
    ref = extract(many_images, lite0, out=tmp_path / "ref.parquet", store=tmp_path / "fresh", device="cpu")
    got = read_table(tmp_path / "k.parquet")
    assert got.paths == ref.table.paths and len(set(got.keys)) == len(got.keys) == 120
    assert len(EmbeddingStore(lite0, store).keys()) == 120  # nothing missing
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in ns.glob("shard-*.parquet")) == 120  # no duplicates
    np.testing.assert_allclose(got.X, ref.table.X, rtol=1e-5, atol=1e-6)


def test_two_concurrent_runs_share_a_store(many_images, lite0, tmp_path, featx_home):
    store = tmp_path / "s"
    other = tmp_path / "other"
    shutil.copytree(many_images / "a", other / "a")  # overlapping content
    env = {**os.environ, "FEATX_HOME": str(featx_home)}
    procs = [subprocess.Popen(_featx("extract", "--features", "last", str(root), "--out", str(tmp_path / f"{i}.parquet"),
                                     "--store", str(store), "--shard-size", "16", "--device", "cpu", "-q"),
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i, root in enumerate([many_images, other])]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    a, b = read_table(tmp_path / "0.parquet"), read_table(tmp_path / "1.parquet")
    assert len(a) == 120 and len(b) == 60
    ia = {k: i for i, k in enumerate(a.keys)}
    np.testing.assert_allclose(b.X, a.X[[ia[k] for k in b.keys]], rtol=1e-5, atol=1e-6)
    assert len(EmbeddingStore(lite0, store).keys()) == 120


def _hardlinked_set(src, root, copies):
    """``copies`` names per photo of ``src``: many rows (a long table write), few embeddings."""
    for c in ("cat", "thing"):
        (root / c).mkdir(parents=True)
        for f in sorted((src / c).iterdir()):
            for j in range(copies):
                os.link(f, root / c / f"{j:03d}_{f.name}")
    return root


def test_two_extracts_writing_the_same_out_leave_one_whole_table(lite0, tmp_path, featx_home):
    """Two real processes write the same --out, again and again: a whole table from one of them."""
    src = make_image_folder(tmp_path / "src", per_class=4)
    roots = [_hardlinked_set(src, tmp_path / "a", 100), _hardlinked_set(src, tmp_path / "b", 99)]
    store = tmp_path / "s"
    refs = [extract(r, lite0, out=tmp_path / f"ref{i}.parquet", store=store, device="cpu").table
            for i, r in enumerate(roots)]  # warm: store and stat records, so each round is quick
    assert {len(t) for t in refs} == {800, 792}
    out = tmp_path / "same.parquet"
    env = {**os.environ, "FEATX_HOME": str(featx_home)}
    for rnd in range(8):
        procs = [subprocess.Popen(_featx("extract", "--features", "last", str(r), "--out", str(out), "--store", str(store),
                                         "--device", "cpu", "-q"),
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in roots]
        for p in procs:
            assert p.wait(timeout=300) == 0, (rnd, p.stderr.read().decode())
        got = read_table(out)  # readable, and all of one writer's table
        ref = next((t for t in refs if len(t) == len(got)), None)
        assert ref is not None and got.paths == ref.paths and got.keys == ref.keys, rnd
        np.testing.assert_array_equal(got.X, ref.X)
        report = json.loads((tmp_path / "same.parquet.report.json").read_text())
        assert report["rows"] in (800, 792)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".same.parquet")]  # no temporaries left


def test_explicit_cuda_without_gpu_is_an_error(image_folder, lite0, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="CUDA"):
        extract(image_folder, lite0, out=tmp_path / "t.parquet", device="cuda")


def test_store_format_version_is_checked(lite0, tmp_path):
    root = tmp_path / "s"
    EmbeddingStore(lite0, root)
    (root / "FORMAT").write_text(json.dumps({"featx_store_format": 99}))
    with pytest.raises(StoreError, match="format 99"):
        EmbeddingStore(lite0, root)


@contextmanager
def read_only(path):
    """Make ``path`` read-only: permissions for a user; a read-only bind mount for root."""
    if os.geteuid() != 0:
        os.chmod(path, 0o500)
        try:
            yield
        finally:
            os.chmod(path, 0o700)
        return
    p = str(path)
    if subprocess.run(["mount", "--bind", p, p], capture_output=True).returncode != 0:
        pytest.skip("root, and cannot bind-mount here to make a read-only directory")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", p], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield
    finally:
        subprocess.run(["umount", p], capture_output=True)


def test_read_only_store(image_folder, lite0, tmp_path):
    root = tmp_path / "ro"
    st = EmbeddingStore(lite0, root)
    ns = root / lite0.fingerprint
    with read_only(ns):
        with pytest.raises(StoreError, match="not writable"):
            extract(image_folder, lite0, out=tmp_path / "t.parquet", store=root, device="cpu")
        assert not list(ns.glob(".*featx-tmp")) and not st.shards()  # the store is left as it was
    ok = extract(image_folder, lite0, out=tmp_path / "t.parquet", store=root, device="cpu")
    assert ok.stats.embedded == 8  # and usable once writable again


def test_cli_extract_with_click_runner(image_folder, lite0, tmp_path):
    out = tmp_path / "cli.parquet"
    r = CliRunner().invoke(main, ["extract", str(image_folder), "--out", str(out), "--store",
                                  str(tmp_path / "s"), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["rows"] == 8 and s["provider"] == "CPUExecutionProvider" and out.is_file()
    r = CliRunner().invoke(main, ["extract", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "no such file or directory" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(main, ["extract", str(empty)])
    assert r.exit_code == 1 and "no images found" in r.output
    r = CliRunner().invoke(main, ["extract", str(image_folder), "--backbone", "resnt50"])
    assert r.exit_code == 1 and "Did you mean 'resnet50'" in r.output


def test_cli_models_and_export(lite0):
    r = CliRunner().invoke(main, ["models", "--json"])
    rows = {m["name"]: m for m in json.loads(r.stdout)}
    assert rows["efficientnet_lite0"]["offline"] is True and rows["resnet50"]["dim"] == 2048
    r = CliRunner().invoke(main, ["export", "efficientnet_lite0", "--features", "last", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["fingerprint"] == lite0.fingerprint
    # with no --features, export gives what extract and the estimators use by default: multi
    from featx.backbones.resolve import resolve_backbone

    r = CliRunner().invoke(main, ["export", "efficientnet_lite0", "--json"])
    got = json.loads(r.stdout)
    assert r.exit_code == 0 and got["dim"] == 4880 and got["features"] == "multi"
    assert got["fingerprint"] == resolve_backbone("efficientnet_lite0", features="multi").fingerprint


def test_real_subprocess_all_bad(tmp_path, featx_home):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jpg").write_bytes(b"junk")
    env = {**os.environ, "FEATX_HOME": str(featx_home)}
    p = subprocess.run(_featx("extract", "--features", "last", str(tmp_path / "d"), "--out", str(tmp_path / "o.parquet")),
                       env=env, capture_output=True, text=True)
    assert p.returncode == 1 and "could be embedded" in p.stderr


def test_no_images_error_message(tmp_path):
    with pytest.raises(FeatXError, match="no images found"):
        (tmp_path / "e").mkdir()
        extract(tmp_path / "e")


def test_full_disk_gives_clear_error_and_keeps_store_valid(many_images, lite0, tmp_path, featx_home):
    """A file-size limit makes shard writes fail like a full disk: clear error, store intact, resumable."""
    import resource

    store = tmp_path / "s"
    env = {**os.environ, "FEATX_HOME": str(featx_home)}
    args = _featx("extract", "--features", "last", str(many_images), "--out", str(tmp_path / "t.parquet"), "--store", str(store),
                  "--batch-size", "8", "--shard-size", "64", "--device", "cpu", "-q")

    def limit():
        import signal as sig

        sig.signal(sig.SIGXFSZ, sig.SIG_IGN)  # get EFBIG from write() instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))  # < one 64-row shard, compressed

    p = subprocess.run(args, env=env, capture_output=True, text=True, preexec_fn=limit)
    assert p.returncode == 1, p.stderr
    assert "cannot write to the embedding store" in p.stderr and "Traceback" not in p.stderr
    ns = store / lite0.fingerprint
    assert not list(ns.glob(".*featx-tmp")) and not list(ns.glob("shard-*"))
    ok = subprocess.run([*args, "--json"], env=env, capture_output=True, text=True, check=True)
    assert json.loads(ok.stdout)["rows"] == 120


def test_mixed_dims_refused(lite0, tmp_path):
    from featx.errors import MismatchError

    st = EmbeddingStore(lite0, tmp_path / "s")
    with pytest.raises(MismatchError, match="dim 1280"):
        st.write(["k1"], np.zeros((1, 512), np.float32))
    meta = tmp_path / "s" / lite0.fingerprint / "meta.json"
    meta.write_text(json.dumps({"dim": 512}))
    with pytest.raises(MismatchError, match="dim 512"):
        EmbeddingStore(lite0, tmp_path / "s")


def test_streamed_table_equals_in_memory_table(lite0, tmp_path):
    """iter_get in small chunks over several shards, and the chunked table writer, change nothing."""
    from featx.embed.table import EmbeddingTable, write_table

    st = EmbeddingStore(lite0, tmp_path / "s")
    rng = np.random.default_rng(0)
    keys = [f"k{i:03d}" for i in range(23)]
    X = rng.standard_normal((23, lite0.dim)).astype(np.float32)
    for a, b in [(0, 7), (7, 15), (15, 23)]:
        st.write(keys[a:b], X[a:b])
    order = list(rng.permutation(23))
    want = [keys[i] for i in order]
    np.testing.assert_array_equal(np.concatenate(list(st.iter_get(want, 5))), X[order])
    np.testing.assert_array_equal(st.get(want), X[order])
    t = EmbeddingTable(paths=[f"{k}.png" for k in want], labels=["a"] * 23, keys=want, X=None,
                       meta={"dim": lite0.dim, "fingerprint": lite0.fingerprint})
    write_table(tmp_path / "streamed.parquet", t, st.iter_get(want, 5))
    t.X = X[order]
    write_table(tmp_path / "memory.parquet", t)
    a, b = read_table(tmp_path / "streamed.parquet"), read_table(tmp_path / "memory.parquet")
    assert a.keys == b.keys == want and a.meta == b.meta
    np.testing.assert_array_equal(a.X, b.X)
    with pytest.raises(KeyError):
        st.get(["nope"])
