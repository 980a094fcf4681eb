"""The Ray engine against the local engine, on a real Ray cluster started here (no mocks)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from featx.embed.images import content_key  # noqa: E402
from featx.embed.runtime import available_providers  # noqa: E402
from featx.embed.store import EmbeddingStore  # noqa: E402
from featx.engines.ray import _device_plan  # noqa: E402
from featx.errors import DeviceError, FeatXError  # noqa: E402
from featx.extract import extract as local_extract  # noqa: E402


def ray_extract(*args, **kwargs):
    return local_extract(*args, engine="ray", **kwargs)


@pytest.fixture(scope="module")
def cluster():
    # num_gpus=1 declares a GPU this machine may not have: the cuda test uses it to check
    # that an actor given a "GPU" without a CUDA runtime dies loudly instead of using the CPU
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def messy_folder(image_folder):
    """Real photos plus the inputs a scale-out run meets: corrupt, empty, duplicated files."""
    (image_folder / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (image_folder / "thing" / "empty.png").write_bytes(b"")
    shutil.copy(image_folder / "cat" / "cat_0.jpg", image_folder / "thing" / "same_bytes.jpg")
    return image_folder


def test_cli_local_ray_prints_no_token_or_progress_bar_warning(lite0, image_folder, tmp_path):
    """featx starts the local Ray itself: Ray's 'token authentication is enabled' and
    'progress bars disabled' warnings must not reach the user's terminal."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    r = subprocess.run([sys.executable, "-m", "featx.cli", "extract", str(image_folder), "--engine",
                        "ray", "--workers", "2", "--device", "cpu", "--out", str(tmp_path / "t.parquet"),
                        "--store", str(tmp_path / "s"), "-q"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "8 images: 8 embedded" in r.stdout
    assert "Token authentication" not in r.stderr, r.stderr
    assert "Progress bars disabled" not in r.stderr, r.stderr
    # Ray Data's actor pools printed this caution at every actor start (ray-project/ray#53727)
    assert "constructor arguments in the object store" not in r.stderr, r.stderr


def test_the_ray_engine_runs_without_ray_data(lite0, image_folder, tmp_path):
    """Ray Data cost 1.5 s of imports in the driver and in every actor before the first batch
    (2 s of a 7 s run on 2 cores; docs/scale.md): the engine uses Ray core only."""
    import os
    import subprocess
    import sys

    code = ("import sys\nfrom featx.backbones.resolve import resolve_backbone\n"
            "from featx.extract import extract\n"
            f"r = extract({str(image_folder)!r}, resolve_backbone({lite0.name!r}), "
            f"store={str(tmp_path / 's')!r}, write=False, device='cpu', engine='ray', workers=2)\n"
            "print(r.stats.embedded, 'ray.data' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-2:] == ["8", "False"], r.stdout


def test_ray_engine_matches_local_engine(cluster, lite0, messy_folder, tmp_path):
    loc = local_extract(messy_folder, lite0, out=tmp_path / "local.parquet", store=tmp_path / "s1",
                        device="cpu")
    rr = ray_extract(messy_folder, lite0, out=tmp_path / "ray.parquet", store=tmp_path / "s2",
                     device="cpu", batch_size=4, shard_size=3)
    a, b = loc.table, rr.table
    assert len(b) == len(a) == 9  # 8 photos + 1 byte-identical copy; 2 bad files dropped
    assert b.paths == a.paths and b.labels == a.labels and b.keys == a.keys
    assert b.meta == a.meta
    np.testing.assert_allclose(b.X, a.X, atol=1e-5, rtol=0)
    assert rr.stats.embedded == 8 and rr.stats.cached == 1  # the copy is embedded once
    assert sorted(rr.stats.failures) == sorted(loc.stats.failures)
    assert dict(rr.stats.failures) == {"cat/broken.jpg": dict(rr.stats.failures)["cat/broken.jpg"],
                                       "thing/empty.png": "empty file (0 bytes)"}
    assert "corrupt or truncated" in dict(rr.stats.failures)["cat/broken.jpg"]
    report = json.loads(rr.report.read_text())
    assert {f["path"] for f in report["failures"]} == {"cat/broken.jpg", "thing/empty.png"}
    assert report["engine"] == "ray" and report["provider"] == "CPUExecutionProvider"
    # same file schema and metadata bytes as the local engine's table
    assert pq.read_schema(rr.out) == pq.read_schema(loc.out)
    assert pq.read_schema(rr.out).metadata == pq.read_schema(loc.out).metadata
    # the driver's ShardWriter wrote the 8 distinct embeddings once each, in shards of 3 rows,
    # and they are the table's rows
    shards = sorted((tmp_path / "s2" / lite0.fingerprint).glob("shard-*.parquet"))
    assert [pq.ParquetFile(p).metadata.num_rows for p in shards] == [3, 3, 2]
    st = EmbeddingStore(lite0, tmp_path / "s2")
    assert st.keys() == set(b.keys) and len(set(b.keys)) == 8
    np.testing.assert_array_equal(st.get(b.keys), b.X)


def test_shipped_models_leave_no_temporary_files(cluster, lite0, image_folder, tmp_path):
    """Ray kills its actors without running finalizers: a shipped model written to a temporary
    directory stayed there after every run (13 MB per actor, gigabytes of /tmp in a week)."""
    import tempfile
    from pathlib import Path

    def leftovers() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("featx-model-*"))

    before = leftovers()
    r = ray_extract(image_folder, lite0, store=tmp_path / "s", device="cpu", write=False)
    assert r.stats.embedded == 8
    ray.shutdown()  # ends the actors' processes, as the end of a user's run does
    try:
        assert leftovers() - before == set()
    finally:
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)


def test_ray_engine_skips_stored_keys(cluster, lite0, image_folder, tmp_path):
    store = tmp_path / "store"
    first = ray_extract(image_folder, lite0, store=store, device="cpu", write=False)
    assert first.stats.embedded == 8
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(image_folder / "thing" / "red.png")
    again = ray_extract(image_folder, lite0, store=store, device="cpu", write=False)
    # only the new image reaches the actors; the rest comes from the store
    assert again.stats.embedded == 1 and again.stats.cached == 8
    assert len(again.table) == 9
    assert set(again.table.keys) - set(first.table.keys) == {
        content_key((image_folder / "thing" / "red.png").read_bytes())}
    np.testing.assert_array_equal(again.table.X[[again.table.keys.index(k) for k in first.table.keys]],
                                  first.table.X)
    # a damaged shard: the driver quarantines it and the cluster recomputes its 8 rows
    ns = store / lite0.fingerprint
    (victim,) = [p for p in ns.glob("shard-*.parquet") if pq.ParquetFile(p).metadata.num_rows == 8]
    victim.write_bytes(victim.read_bytes()[:-200])
    third = ray_extract(image_folder, lite0, store=store, device="cpu", write=False)
    assert third.stats.embedded == 8 and third.stats.cached == 1
    assert (ns / "quarantine" / victim.name).is_file()
    np.testing.assert_allclose(third.table.X, again.table.X, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("CUDAExecutionProvider" in available_providers(),
                    reason="this machine really has CUDA; the loud-failure path needs its absence")
def test_cuda_actor_without_cuda_fails_loudly(cluster, lite0, image_folder, tmp_path):
    # the cluster advertises a GPU, so the actor is scheduled with num_gpus=1; ONNX Runtime
    # has no CUDA provider here, and the run must stop rather than embed on the CPU
    with pytest.raises(DeviceError, match="CUDA provider"):
        ray_extract(image_folder, lite0, store=tmp_path / "s", device="cuda", write=False)
    assert not list((tmp_path / "s").rglob("shard-*.parquet"))
    # and auto on a cluster with GPUs means those GPUs, so it takes the same loud path
    assert _device_plan(ray, "auto") == "cuda"
    with pytest.raises(FeatXError, match="not one of"):
        _device_plan(ray, "gpu")


def test_cli_engine_ray(cluster, lite0, image_folder, tmp_path):
    from click.testing import CliRunner

    from featx.cli import main

    out = tmp_path / "cli.parquet"
    r = CliRunner().invoke(main, ["extract", str(image_folder), "--engine", "ray", "--out", str(out),
                                  "--store", str(tmp_path / "s"), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"] == 8
    assert json.loads(out.with_name(out.name + ".report.json").read_text())["engine"] == "ray"
    r = CliRunner().invoke(main, ["extract", str(image_folder), "--address", "auto"])
    assert r.exit_code == 2 and "--address needs --engine ray" in r.output


def test_ray_engine_gives_the_local_engines_embeddings_bit_for_bit(cluster, lite0, image_folder, tmp_path):
    """CPU actors decode and embed like the local engine's readers (one thread, one image a call)."""
    from featx.embed.statcache import StatCache

    loc = local_extract(image_folder, lite0, store=tmp_path / "s1", device="cpu", write=False)
    rr = ray_extract(image_folder, lite0, store=tmp_path / "s2", device="cpu", write=False, batch_size=3)
    assert rr.table.keys == loc.table.keys
    np.testing.assert_array_equal(rr.table.X, loc.table.X)
    # the driver keeps the stat cache, as the local engine does: a re-run hashes no file again
    cache = StatCache(tmp_path / "s2", image_folder)
    assert sorted(cache.entries) == sorted(str(image_folder / p) for p in rr.table.paths)
    assert sorted(k for _, k in cache.entries.values()) == sorted(rr.table.keys)
    again = ray_extract(image_folder, lite0, store=tmp_path / "s2", device="cpu", write=False)
    assert again.stats.cached == 8 and again.stats.embedded == 0 and again.table.keys == rr.table.keys


def test_ray_hash_tasks_use_the_stat_cache_too(cluster, lite0, image_folder, tmp_path):
    """On a cluster of several nodes the hashing runs in Ray tasks; unchanged files skip it."""
    from featx.engines.ray import RayEngine

    eng = RayEngine(hash_on_driver=False)
    first = local_extract(image_folder, lite0, store=tmp_path / "s", device="cpu", write=False, engine=eng)
    loc = local_extract(image_folder, lite0, store=tmp_path / "s2", device="cpu", write=False)
    assert first.table.keys == loc.table.keys and first.stats.embedded == 8
    (image_folder / "cat" / "cat_0.jpg").write_bytes((image_folder / "thing" / "thing_0.jpg").read_bytes())
    again = local_extract(image_folder, lite0, store=tmp_path / "s", device="cpu", write=False, engine=eng)
    assert again.stats.embedded == 0 and again.stats.cached == 8  # the edited file: hashed, found
    assert again.table.keys[again.table.paths.index("cat/cat_0.jpg")] == \
        again.table.keys[again.table.paths.index("thing/thing_0.jpg")]


def test_a_local_ray_started_by_featx_runs_its_workers_at_the_callers_priority(tmp_path):
    """Ray's default worker niceness (15) made a featx-started local Ray lose the CPU to any
    normal-priority process on the machine; featx starts its workers at the driver's priority."""
    import os
    import subprocess
    import sys

    code = ("import os\nfrom featx.engines.ray import connect\nray, started = connect(None, 1)\n"
            "assert started\nprint(os.nice(0), ray.get(ray.remote(lambda: os.nice(0)).remote()))\n"
            "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    driver, worker = map(int, r.stdout.split()[-2:])
    assert worker == driver, r.stdout
