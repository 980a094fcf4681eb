"""Hostile and unlucky writes: a prune during an extract, killed writers' temporaries, two
writers racing for one output, a full disk, an unwritable folder.

Real backbone, real photos, real files; the full disk is a real (tiny) filesystem where one
can be mounted, else the test says why it is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from featx.cache import prune_cache
from featx.embed.store import DEAD_WRITER_GRACE_S
from featx.errors import StoreError
from featx.extract import extract


def test_prune_during_extract_names_the_prune_and_a_rerun_is_right(image_folder, lite0, tmp_path):
    store = tmp_path / "s"
    ref = extract(image_folder, lite0, store=tmp_path / "ref", device="cpu", write=False)
    pruned = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "embed" and done and not pruned:  # the first shard is written: prune now
            pruned.append(prune_cache(store, backbone=lite0.fingerprint, dry_run=False))

    with pytest.raises(StoreError, match=r"removed while this run wrote.*cache prune.*run the same command "
                                         r"again"):
        extract(image_folder, lite0, store=store, device="cpu", write=False, batch_size=2, shard_size=2,
                workers=1, progress=progress)
    assert pruned and pruned[0].removed
    again = extract(image_folder, lite0, store=store, device="cpu", write=False)
    assert again.table.keys == ref.table.keys
    np.testing.assert_allclose(again.table.X, ref.table.X, rtol=1e-5, atol=1e-6)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_killed_writers_shard_temporary_goes_on_the_next_run(image_folder, lite0, tmp_path):
    """A SIGKILLed extract's shard temporary is removed once its writer is gone, not a day later."""
    store = tmp_path / "s"
    extract(image_folder, lite0, store=store, device="cpu", write=False)
    ns = store / lite0.fingerprint
    old = time.time() - DEAD_WRITER_GRACE_S - 5
    dead = ns / f".shard-{time.time_ns():020d}-{_dead_pid()}-0123abcd.parquet.x1y2z3w4.featx-tmp"
    live_writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = ns / f".shard-{time.time_ns():020d}-{live_writer.pid}-4567cdef.parquet.a1b2c3d4.featx-tmp"
        fresh = ns / f".shard-{time.time_ns():020d}-{_dead_pid()}-89abcdef.parquet.q1w2e3r4.featx-tmp"
        for p in (dead, live, fresh):
            p.write_bytes(b"PAR1 half a shard")
        for p in (dead, live):
            os.utime(p, (old, old))
        again = extract(image_folder, lite0, store=store, device="cpu", write=False)
        assert again.stats.cached == 8
        assert not dead.exists()  # its writer is gone
        assert live.exists()  # its writer may still be writing
        assert fresh.exists()  # touched a moment ago: maybe a writer on another machine
    finally:
        live_writer.kill()
        live_writer.wait()


# ---- two writers, one output -------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_heads(lite0, tmp_path_factory):
    """Two real heads on real photo embeddings whose one-file classifiers differ (class names)."""
    from featx.engines.files import embed_arrays
    from featx.heads.fit import fit_head
    from featx.heads.headfile import save_head

    from .helpers import photos

    p = photos()
    imgs = [p[n][i * 20:i * 20 + 300, i * 20:i * 20 + 300] for n in ("chelsea", "cat", "coffee", "rocket")
            for i in range(3)]
    X = embed_arrays([np.ascontiguousarray(a) for a in imgs], lite0, device="cpu")
    root = tmp_path_factory.mktemp("heads")
    heads = []
    for names in (("cat", "thing"), ("animal", "object")):
        y = [names[0]] * 6 + [names[1]] * 6
        pipe, rep = fit_head(X, y, head="logreg", C=1.0)
        heads.append(save_head(root / f"{names[0]}.joblib", pipe, rep["classes"], lite0, rep))
    return heads


class SlowDisk:
    """Every writer's first open of a file in ``folder`` waits until both writers have opened
    theirs: the two writes overlap, as on a slow disk. A real audit hook on the real ``open``."""

    def __init__(self, folder, writers: int = 2) -> None:
        import threading

        self.folder, self.on = str(folder), False
        self.barrier = threading.Barrier(writers, timeout=60)
        self.seen = threading.local()
        sys.addaudithook(self.hook)

    def hook(self, event: str, args) -> None:
        if not self.on or event != "open" or getattr(self.seen, "done", False):
            return
        path, mode, flags = args
        writing = (mode and ("w" in mode or "+" in mode)) or (mode is None and flags & (os.O_WRONLY | os.O_RDWR))
        if writing and os.path.dirname(os.fspath(path)) == self.folder:
            self.seen.done = True
            self.barrier.wait()


def test_two_exports_to_one_out_leave_one_complete_classifier(two_heads, tmp_path):
    """Issue 23 failure 3: the fixed temporary name let one writer rename the other's half-written
    file (corrupt classifier.onnx, reported as a success) and the other die with FileNotFoundError."""
    import json
    import threading

    import onnx

    from featx.heads.onnx_classifier import export_classifier

    out = tmp_path / "out" / "classifier.onnx"
    out.parent.mkdir()
    sizes = {}  # classes -> size of that head's classifier written alone (the bytes differ by a uuid)
    for i, h in enumerate(two_heads):
        info = export_classifier(h, tmp_path / f"alone{i}.onnx")
        sizes[tuple(info["classes"])] = info["bytes"]
    assert len(sizes) == 2
    slow = SlowDisk(out.parent)
    errors: list[BaseException] = []

    def write(h) -> None:
        try:
            export_classifier(h, out)
        except BaseException as e:  # reported below, with the other writer's outcome
            errors.append(e)

    slow.on = True
    try:
        threads = [threading.Thread(target=write, args=(h,)) for h in two_heads]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        slow.on = False
    assert not errors, errors
    model = onnx.load(str(out))  # one writer's complete file, never a mix
    onnx.checker.check_model(model)
    classes = tuple(json.loads({p.key: p.value for p in model.metadata_props}["featx.classes"]))
    assert out.stat().st_size == sizes[classes]
    assert sorted(p.name for p in out.parent.iterdir()) == ["classifier.onnx"]  # no temporaries left


# ---- a full disk -------------------------------------------------------------------------------

def run_with_file_limit(limit: int, *args: str, cwd, env=None) -> subprocess.CompletedProcess:
    """``featx ARGS`` in a process that may not write files beyond ``limit`` bytes: the kernel
    then fails its writes (EFBIG) exactly as a full disk does (ENOSPC), with no root needed."""
    import resource
    import signal

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, do not kill the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "featx.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, preexec_fn=limited, env=env)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, two_heads):
    """A labelled folder of photos, embedded once (so a later run only writes its outputs)."""
    from .helpers import make_image_folder

    root = tmp_path_factory.mktemp("full")
    make_image_folder(root / "data", per_class=3)
    r = subprocess.run([sys.executable, "-m", "featx.cli", "predict", str(two_heads[0]), "data", "-q",
                        "--out", "warm.csv"], cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return root


def full_disk_line(r: subprocess.CompletedProcess, what: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert f"cannot write {what}" in r.stderr and "disk is full" in r.stderr, r.stderr


@pytest.mark.parametrize("command", ["predict", "export-classifier", "evaluate"])
def test_a_full_disk_is_one_line_and_leaves_no_temporary(evaluated, two_heads, command):
    head = str(two_heads[0])
    args = {"predict": ["predict", head, "data", "--out", "out/p.csv"],
            "export-classifier": ["export-classifier", head, "--out", "out/c.onnx"],
            "evaluate": ["evaluate", head, "data", "--out-dir", "out", "--force"]}[command]
    (evaluated / "out").mkdir(exist_ok=True)
    r = run_with_file_limit(100, *args, "-q" if command != "export-classifier" else "--json", cwd=evaluated)
    full_disk_line(r, "out/")
    assert not [p.name for p in (evaluated / "out").iterdir()], "nothing half-written, no temporary"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_full_disk_during_export_is_one_line(tmp_path, precision):
    env = {**os.environ, "FEATX_HOME": str(tmp_path / "home")}
    r = run_with_file_limit(1 << 20, "export", "efficientnet_lite0", "--precision", precision, cwd=tmp_path,
                            env=env)
    full_disk_line(r, str(tmp_path / "home" / "backbones"))
    assert not list((tmp_path / "home" / "backbones").iterdir())


# ---- outputs that are not featx's, a FEATX_HOME that cannot be ---------------------------------

def test_extract_out_never_replaces_a_file_that_is_not_a_table(image_folder, tmp_path):
    from PIL import Image

    from .helpers import photos, run_cli

    victim = tmp_path / "victim.png"
    Image.fromarray(photos()["chelsea"]).save(victim)
    before = victim.read_bytes()
    r = run_cli("extract", str(image_folder), "--out", str(victim), "-q", ok=False)
    assert r.exit_code == 1 and "not a featx embeddings table" in r.output and "--force" in r.output
    assert victim.read_bytes() == before
    table = tmp_path / "t.featx.parquet"
    run_cli("extract", str(image_folder), "--out", str(table), "-q")
    run_cli("extract", str(image_folder), "--out", str(table), "-q")  # a table: replaced, as before
    run_cli("extract", str(image_folder), "--out", str(victim), "-q", "--force")
    assert victim.read_bytes() != before


@pytest.mark.parametrize("kind", ["devnull", "file", "under-a-file", "read-only"])
def test_an_unusable_featx_home_is_one_line(image_folder, tmp_path, kind):
    from .helpers import unprivileged

    home = {"devnull": "/dev/null", "file": str(tmp_path / "f"), "under-a-file": str(tmp_path / "f" / "home"),
            "read-only": str(tmp_path / "ro")}[kind]
    (tmp_path / "f").write_text("not a folder")
    (tmp_path / "ro").mkdir(mode=0o555)
    cmd = unprivileged([sys.executable, "-m", "featx.cli", "extract", str(image_folder), "-q",
                        "--out", str(tmp_path / "t.featx.parquet")])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "FEATX_HOME": home})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"FEATX_HOME={home}: cannot use" in r.stderr and "set FEATX_HOME to a folder you can write" in r.stderr


def test_evaluate_beside_a_head_it_cannot_write_warns_and_succeeds(evaluated, tmp_path):
    """The card update is optional: metrics written, one warning line, exit 0."""
    from .helpers import run_cli, unprivileged

    heads = tmp_path / "heads"
    heads.mkdir()
    run_cli("extract", str(evaluated / "data"), "--out", str(heads / "t.featx.parquet"), "-q")
    run_cli("fit-head", "--embeddings", str(heads / "t.featx.parquet"), "--out", str(heads / "h.joblib"),
            "--C", "1")
    card = heads / "h.README.md"
    before = card.read_text()
    os.chmod(heads, 0o555)
    os.chmod(card, 0o444)
    try:
        cmd = unprivileged([sys.executable, "-m", "featx.cli", "evaluate", str(heads / "h.joblib"),
                            str(evaluated / "data"), "--out-dir", str(tmp_path / "ev"), "-q"])
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        os.chmod(heads, 0o755)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "could not update the head's card" in r.stderr and "metrics.json" in r.stderr
    assert (tmp_path / "ev" / "metrics.json").is_file()
    assert card.read_text() == before
