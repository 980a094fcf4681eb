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
