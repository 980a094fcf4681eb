"""What keeps a cached re-run's cost per image flat (bench/scale.py measures it at 1M rows)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import featx.embed.store as store_mod
from featx.embed.scan import resolve_item_path
from featx.embed.statcache import StatCache
from featx.embed.store import VERIFIED, DamagedShardError, EmbeddingStore, ShardWriter
from featx.extract import extract


def _filled(lite0, root: Path, n: int = 12, shard: int = 4) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(0)
    keys = [f"k{i:03d}" for i in range(n)]
    X = rng.standard_normal((n, lite0.dim)).astype(np.float32)
    with ShardWriter(EmbeddingStore(lite0, root), shard) as w:
        w.add(keys, X)
    return keys, X


@pytest.fixture
def full_reads(monkeypatch) -> list[str]:
    """Names of the shards whose embeddings are read (the real reader, counted)."""
    seen: list[str] = []
    real = store_mod.read_shard

    def counting(path, dim, *, embeddings=True):
        if embeddings:
            seen.append(Path(path).name)
        return real(path, dim, embeddings=embeddings)

    monkeypatch.setattr(store_mod, "read_shard", counting)
    return seen


def test_a_rerun_reads_each_reused_shard_once(lite0, tmp_path, full_reads):
    """stored() used to verify every shard again in each run, then get() read it once more."""
    keys, X = _filled(lite0, tmp_path / "s")
    ns = tmp_path / "s" / lite0.fingerprint
    assert len(json.loads((ns / VERIFIED).read_text())["shards"]) == 3  # the writer recorded them
    (ns / VERIFIED).unlink()  # as a store of earlier featx
    first = EmbeddingStore(lite0, tmp_path / "s")  # the first run: checks each shard, records it
    assert first.stored(keys) == set(keys)
    assert len(full_reads) == 3
    full_reads.clear()
    again = EmbeddingStore(lite0, tmp_path / "s")  # the next run, a new process
    assert again.stored(keys) == set(keys)
    assert full_reads == []  # trusted from VERIFIED: size, mtime, ctime and inode unchanged
    np.testing.assert_array_equal(again.get(keys), X)
    assert len(full_reads) == 3  # the bytes served are still verified, once per shard


def test_iter_get_reads_a_shard_spanning_two_chunks_once(lite0, tmp_path, full_reads):
    keys, X = _filled(lite0, tmp_path / "s", n=12, shard=6)
    st = EmbeddingStore(lite0, tmp_path / "s")
    got = np.concatenate(list(st.iter_get(keys, chunk=4)))  # chunks 0-3, 4-7 (two shards), 8-11
    np.testing.assert_array_equal(got, X)
    assert len(full_reads) == 2


def test_a_shard_edited_in_place_after_it_was_recorded_is_checked_again(lite0, tmp_path):
    """An in-place edit that keeps size and mtime changes ctime: the record no longer matches."""
    keys, _ = _filled(lite0, tmp_path / "s")
    EmbeddingStore(lite0, tmp_path / "s").stored(keys)
    ns = tmp_path / "s" / lite0.fingerprint
    victim = sorted(ns.glob("shard-*.parquet"))[1]
    st = os.stat(victim)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(victim, "r+b") as f:
        f.write(data)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(victim).st_size, os.stat(victim).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert EmbeddingStore(lite0, tmp_path / "s").stored(keys) == set(keys[:4] + keys[8:])
    assert (ns / "quarantine" / victim.name).is_file()


def test_damage_that_no_stat_shows_is_caught_when_the_rows_are_served(lite0, tmp_path):
    """A failing disk changes bytes, not the stat: stored() trusts the record, get() does not."""
    keys, _ = _filled(lite0, tmp_path / "s")
    EmbeddingStore(lite0, tmp_path / "s").stored(keys)
    ns = tmp_path / "s" / lite0.fingerprint
    victim = sorted(ns.glob("shard-*.parquet"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(data)
    # what the disk would have left: the record still matching the file's stat
    doc = json.loads((ns / VERIFIED).read_text())
    s = os.stat(victim)
    doc["shards"][victim.name] = [s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino]
    (ns / VERIFIED).write_text(json.dumps(doc))
    st = EmbeddingStore(lite0, tmp_path / "s")
    assert st.stored(keys) == set(keys)
    with pytest.raises(DamagedShardError, match="Run the command again"):
        st.get(keys)
    assert (ns / "quarantine" / victim.name).is_file()
    assert victim.name not in json.loads((ns / VERIFIED).read_text())["shards"]
    assert EmbeddingStore(lite0, tmp_path / "s").stored(keys) == set(keys[4:])


def test_a_rerun_over_unchanged_files_does_not_rewrite_the_stat_cache(image_folder, lite0, tmp_path):
    store = tmp_path / "s"
    extract(image_folder, lite0, store=store, device="cpu", write=False)
    cache = StatCache(store, image_folder).path
    before = os.stat(cache)
    again = extract(image_folder, lite0, store=store, device="cpu", write=False)
    assert again.stats.cached == 8 and again.stats.embedded == 0
    after = os.stat(cache)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    (image_folder / "cat" / "cat_0.jpg").unlink()  # a file gone: the record changes
    extract(image_folder, lite0, store=store, device="cpu", write=False)
    assert len(StatCache(store, image_folder).entries) == 7


@pytest.mark.parametrize("root", ["/data/x", "/data/x/", "/data//x", ".", "/", "rel/dir", "./rel"])
@pytest.mark.parametrize("path", ["a/b.png", "./a.png", "a//b.png", "/abs/c.png", "a/./b.png", "x.png",
                                  "a/b/", "..", "../a.png", "a/../b.png", ".hidden/a.png", "s3://b/k.jpg"])
def test_resolve_item_path_is_pathlibs_join(root, path):
    want = path if path.startswith("s3://") else str(Path(root) / path)
    assert resolve_item_path(root, path) == want
    assert resolve_item_path(Path(root), path) == want
