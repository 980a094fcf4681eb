"""featx.atomic: concurrent writers of one path leave one complete file, never a mix."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest

from featx.atomic import atomic_path, clean_stale_temporaries, write_bytes


def _writer(path: str, byte: int, n: int) -> None:
    for _ in range(n):
        write_bytes(path, bytes([byte]) * 3_000_000)


def test_two_processes_writing_one_path_never_mix(tmp_path):
    target = tmp_path / "out.bin"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(target), b, 15)) for b in (1, 2)]
    for p in procs:
        p.start()
    seen = set()
    while any(p.is_alive() for p in procs):
        if target.exists():
            data = target.read_bytes()
            assert len(data) == 3_000_000 and len(set(data)) == 1, "a reader saw a mixed or short file"
            seen.add(data[0])
    for p in procs:
        p.join()
        assert p.exitcode == 0
    data = target.read_bytes()
    assert len(data) == 3_000_000 and len(set(data)) == 1
    assert not list(tmp_path.glob(".*featx-tmp")), "no temporaries left behind"


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_final_file_gets_normal_permissions(tmp_path):
    p = write_bytes(tmp_path / "x", b"1")
    mask = os.umask(0o022)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask


def test_stale_temporaries_are_cleaned(tmp_path):
    old = tmp_path / ".t.parquet.abc.featx-tmp"
    new = tmp_path / ".u.parquet.def.featx-tmp"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    past = time.time() - 3 * 86400
    os.utime(old, (past, past))
    assert clean_stale_temporaries(tmp_path) == 1
    assert not old.exists() and new.exists()
