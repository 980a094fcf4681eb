"""The embedding store: one ShardWriter, checksummed shards, the stat cache, `featx cache`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from featx.cli import main
from featx.embed.store import (
    DamagedShardError,
    EmbeddingStore,
    NonFiniteEmbeddingError,
    ShardWriter,
    read_shard,
)
from featx.errors import MismatchError
from featx.extract import extract


def _rows(store_dir) -> list[int]:
    return [pq.ParquetFile(p).metadata.num_rows for p in sorted(store_dir.glob("shard-*.parquet"))]


def _random(n, dim, seed=0):
    rng = np.random.default_rng(seed)
    return [f"k{seed}-{i}" for i in range(n)], rng.standard_normal((n, dim)).astype(np.float32)


# ---------------------------------------------------------------- ShardWriter

def test_shard_writer_cuts_shards_of_exactly_shard_size_rows(lite0, tmp_path):
    st = EmbeddingStore(lite0, tmp_path / "s")
    keys, X = _random(10, lite0.dim)
    with ShardWriter(st, shard_size=4, flush_seconds=1e9) as w:
        for a in range(0, 10, 3):
            w.add(keys[a:a + 3], X[a:a + 3])
        assert _rows(st.dir) == [4, 4]  # full shards go out at once, the rest waits
    assert _rows(st.dir) == [4, 4, 2] and (w.rows_written, w.shards_written) == (10, 3)
    np.testing.assert_array_equal(EmbeddingStore(lite0, tmp_path / "s").get(keys), X)


def test_shard_writer_flushes_when_the_block_ends_by_ctrl_c(lite0, tmp_path):
    st = EmbeddingStore(lite0, tmp_path / "s")
    keys, X = _random(3, lite0.dim)
    with pytest.raises(KeyboardInterrupt), ShardWriter(st, shard_size=100, flush_seconds=1e9) as w:
        w.add(keys, X)
        assert _rows(st.dir) == []
        raise KeyboardInterrupt
    assert _rows(st.dir) == [3]
    np.testing.assert_array_equal(EmbeddingStore(lite0, tmp_path / "s").get(keys), X)


def test_shard_writer_flushes_after_flush_seconds(lite0, tmp_path):
    st = EmbeddingStore(lite0, tmp_path / "s")
    keys, X = _random(3, lite0.dim)
    w = ShardWriter(st, shard_size=100, flush_seconds=0.0)  # every add is already "late"
    w.add(keys[:2], X[:2])
    w.add(keys[2:], X[2:])
    assert _rows(st.dir) == [2, 1]


def test_shard_writer_refuses_non_finite_rows_and_wrong_dims(lite0, tmp_path):
    st = EmbeddingStore(lite0, tmp_path / "s")
    keys, X = _random(4, lite0.dim)
    X[1, 5] = np.nan
    X[3, 0] = -np.inf
    with ShardWriter(st) as w:
        assert w.add(keys, X) == [1, 3]
        with pytest.raises(MismatchError, match="dim 1280"):
            w.add(["x"], np.zeros((1, 512), np.float32))
    assert EmbeddingStore(lite0, tmp_path / "s").keys() == {keys[0], keys[2]}
    with pytest.raises(NonFiniteEmbeddingError, match=keys[1]):
        st.write(keys, X)


def test_engines_write_shards_of_shard_size_rows(image_folder, lite0, tmp_path):
    r = extract(image_folder, lite0, store=tmp_path / "s", device="cpu", write=False, shard_size=3)
    assert _rows(tmp_path / "s" / lite0.fingerprint) == [3, 3, 2]
    assert r.stats.embedded == 8


def test_embed_arrays_through_the_store_are_the_encoder_output_bit_for_bit(lite0, tmp_path):
    import skimage.data as sd

    from featx.embed.images import array_to_pil, resize_crop
    from featx.embed.runtime import Encoder
    from featx.engines.files import embed_arrays

    imgs = [sd.chelsea(), sd.coffee(), sd.astronaut(), sd.rocket(), sd.camera()]  # camera: grey
    got = embed_arrays(imgs, lite0, device="cpu", store=tmp_path / "s", batch_size=2, shard_size=2)
    assert _rows(tmp_path / "s" / lite0.fingerprint) == [2, 2, 1]
    pixels = np.stack([resize_crop(array_to_pil(a, "x"), lite0.preprocess) for a in imgs])
    want = np.concatenate([Encoder(lite0, device="cpu")(pixels[i:i + 2]) for i in range(0, 5, 2)])
    np.testing.assert_array_equal(got, want)
    again = embed_arrays(imgs, lite0, device="cpu", store=tmp_path / "s")  # from the cache
    np.testing.assert_array_equal(again, want)


# ---------------------------------------------------------------- shard integrity

def test_shards_carry_checksums_and_page_crcs(lite0, tmp_path):
    st = EmbeddingStore(lite0, tmp_path / "s")
    keys, X = _random(5, lite0.dim)
    path = st.write(keys, X)
    footer = json.loads(pq.read_schema(path).metadata[b"featx.shard"])
    assert (footer["rows"], footer["dim"]) == (5, lite0.dim)
    assert len(footer["sha256_key"]) == len(footer["sha256_embedding"]) == 64
    content = read_shard(path, lite0.dim)
    assert content.checksummed and content.keys == keys
    np.testing.assert_array_equal(content.embeddings, X)
    # one flipped byte in a data page is caught by the page CRC, before any checksum
    col = pq.ParquetFile(path).metadata.row_group(0).column(1)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + col.total_compressed_size // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedShardError, match="CRC"):
        read_shard(path, lite0.dim)


def test_shards_from_before_checksums_are_still_read(image_folder, lite0, tmp_path):
    """A store written by earlier featx (no footer, no page CRCs) keeps serving its rows."""
    ref = extract(image_folder, lite0, store=tmp_path / "s", device="cpu", write=False)
    ns = tmp_path / "s" / lite0.fingerprint
    for p in ns.glob("shard-*.parquet"):  # rewrite each shard the way featx 0.1 wrote it
        t = pq.read_table(p)
        pq.write_table(t.replace_schema_metadata(None), p)
        assert not read_shard(p, lite0.dim).checksummed
    again = extract(image_folder, lite0, store=tmp_path / "s", device="cpu", write=False)
    assert again.stats.cached == 8 and again.stats.embedded == 0
    np.testing.assert_array_equal(again.table.X, ref.table.X)
    r = CliRunner().invoke(main, ["cache", "verify", "--store", str(tmp_path / "s"), "--json"])
    assert r.exit_code == 0, r.output
    (n,) = json.loads(r.stdout)["namespaces"]
    assert (n["shards_ok"], n["rows_ok"], n["unchecksummed"]) == (1, 8, 1)


def test_in_place_edit_keeping_size_and_mtime_is_re_embedded(image_folder, lite0, tmp_path):
    """git-style stat cache: new bytes with the old size and mtime must not match (ctime differs)."""
    import io

    from PIL import Image

    from featx.embed.images import content_key

    store = tmp_path / "s"
    first = extract(image_folder, lite0, store=store, device="cpu", write=False)
    victim = image_folder / "cat" / "cat_0.jpg"
    st = os.stat(victim)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 200, 40)).save(buf, "JPEG")
    assert buf.tell() < st.st_size
    new = buf.getvalue().ljust(st.st_size, b"\0")  # a JPEG reader ignores bytes after the image
    with open(victim, "r+b") as f:  # in place, like dd conv=notrunc: same inode
        f.write(new)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # like touch -r: same mtime
    after = os.stat(victim)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    again = extract(image_folder, lite0, store=store, device="cpu", write=False)
    i = again.table.paths.index("cat/cat_0.jpg")
    assert again.stats.embedded == 1 and again.stats.cached == 7
    assert again.table.keys[i] == content_key(new) != first.table.keys[i]
    fresh = extract(image_folder, lite0, store=tmp_path / "fresh", device="cpu", write=False)
    np.testing.assert_allclose(again.table.X, fresh.table.X, rtol=1e-5, atol=1e-6)


def test_each_file_is_hashed_once_on_a_first_extract(image_folder, lite0, tmp_path, monkeypatch):
    """The readers used to hash every file twice (once to look it up, once after decoding)."""
    import featx.embed.images as images_mod
    import featx.engines.local as local

    hashed: list[int] = []

    def counting(data: bytes) -> str:  # the real hash, counted
        hashed.append(len(data))
        return images_mod.content_key(data)

    monkeypatch.setattr(local, "content_key", counting)
    r = extract(image_folder, lite0, store=tmp_path / "s", device="cpu", write=False)
    assert r.stats.embedded == len(r.table) == 8
    assert len(hashed) == 8
    fresh = extract(image_folder, lite0, store=tmp_path / "s2", device="cpu", write=False)
    assert r.table.keys == fresh.table.keys


def test_a_file_changed_after_hashing_gets_the_key_of_the_bytes_decoded(image_folder, lite0):
    """The hashed key stands only while the file's stat is the one it was hashed with."""
    import io

    from PIL import Image

    from featx.embed.images import content_key
    from featx.embed.statcache import stat_of
    from featx.engines.local import decode_batch

    path = str(image_folder / "cat" / "cat_0.jpg")
    old_key, old_stat = content_key(Path(path).read_bytes()), stat_of(path)
    pre = lite0.preprocess
    assert decode_batch([(0, path, old_key, old_stat)], pre)[1] == [old_key]
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 200, 40)).save(buf, "JPEG")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    ok, keys, _, fails = decode_batch([(0, path, old_key, old_stat)], pre)
    assert ok == [0] and not fails
    assert keys == [content_key(buf.getvalue())] != [old_key]
    assert decode_batch([(0, path, old_key)], pre)[1] == [content_key(buf.getvalue())]  # no stat: hash


# ---------------------------------------------------------------- featx cache

@pytest.fixture
def cached(image_folder, lite0, tmp_path):
    """A store with two namespaces: lite0 (8 photos, 2 shards) and a small 'other' backbone."""
    import dataclasses

    store = tmp_path / "s"
    extract(image_folder, lite0, store=store, device="cpu", write=False, batch_size=4, shard_size=4)
    side = dataclasses.replace(lite0.sidecar, name="other_net", fingerprint="0123456789abcdef", dim=8)
    other = dataclasses.replace(lite0, sidecar=side)
    with ShardWriter(EmbeddingStore(other, store)) as w:
        w.add(*_random(3, 8))
    return store, other


def _cache(*args):
    r = CliRunner().invoke(main, ["cache", *args])
    return r, (json.loads(r.stdout) if "--json" in args and r.exit_code in (0, 1) else None)


def test_cache_info(cached, lite0):
    store, other = cached
    r, doc = _cache("info", "--store", str(store), "--json")
    assert r.exit_code == 0, r.output
    ns = {n["fingerprint"]: n for n in doc["namespaces"]}
    assert set(ns) == {lite0.fingerprint, other.fingerprint}
    a, b = ns[lite0.fingerprint], ns[other.fingerprint]
    assert (a["backbone"], a["dim"], a["rows"], a["shards"]) == ("efficientnet_lite0", 1280, 8, 2)
    assert (b["backbone"], b["dim"], b["rows"], b["shards"]) == ("other_net", 8, 3, 1)
    on_disk = sum(p.stat().st_size for p in (store / lite0.fingerprint).rglob("*") if p.is_file())
    assert a["bytes"] == on_disk > b["bytes"] > 0 and doc["bytes"] == a["bytes"] + b["bytes"]
    assert abs(a["last_used"] - time.time()) < 3600
    r, _ = _cache("info", "--store", str(store))
    assert r.exit_code == 0 and "efficientnet_lite0" in r.output and "other_net" in r.output


def test_cache_prune_older_than_is_a_dry_run_until_yes(cached, lite0, image_folder):
    store, other = cached
    old = time.time() - 40 * 86400
    os.utime(store / other.fingerprint / "LAST_USED", (old, old))
    r, doc = _cache("prune", "--older-than", "30d", "--store", str(store), "--json")
    assert r.exit_code == 0, r.output
    assert doc["dry_run"] and [x["fingerprint"] for x in doc["removed"]] == [other.fingerprint]
    assert (store / other.fingerprint).is_dir()  # nothing removed yet
    r, _ = _cache("prune", "--older-than", "30d", "--store", str(store))
    assert "would remove" in r.output and "--yes" in r.output
    r, doc = _cache("prune", "--older-than", "30d", "--yes", "--store", str(store), "--json")
    assert r.exit_code == 0 and not doc["dry_run"]
    assert not (store / other.fingerprint).exists() and (store / lite0.fingerprint).is_dir()
    again = extract(image_folder, lite0, store=store, device="cpu", write=False)
    assert again.stats.cached == 8  # the recently used backbone kept its embeddings


def test_cache_prune_by_backbone_name_or_fingerprint(cached, lite0):
    store, other = cached
    r, doc = _cache("prune", "--backbone", other.fingerprint[:6], "--yes", "--store", str(store), "--json")
    assert r.exit_code == 0 and [x["backbone"] for x in doc["removed"]] == ["other_net"]
    r, doc = _cache("prune", "--backbone", "efficientnet_lite0", "--yes", "--store", str(store), "--json")
    assert r.exit_code == 0 and [x["fingerprint"] for x in doc["removed"]] == [lite0.fingerprint]
    r, doc = _cache("info", "--store", str(store), "--json")
    assert doc["namespaces"] == []
    r, _ = _cache("prune", "--backbone", "resnet50", "--store", str(store))
    assert r.exit_code == 1 and "no cached embeddings for backbone 'resnet50'" in r.output


def test_cache_prune_refuses_bad_arguments(cached):
    store, _ = cached
    r, _ = _cache("prune", "--store", str(store))
    assert r.exit_code == 2 and "say what to prune" in r.output
    r, _ = _cache("prune", "--older-than", "30x", "--store", str(store))
    assert r.exit_code == 2 and "not a duration" in r.output


def test_cache_verify_quarantines_and_reports(cached, lite0):
    store, other = cached
    victim = sorted((store / lite0.fingerprint).glob("shard-*.parquet"))[1]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    r, doc = _cache("verify", "--store", str(store), "--json")
    assert r.exit_code == 1 and not doc["ok"]
    ns = {n["fingerprint"]: n for n in doc["namespaces"]}
    assert [q["shard"] for q in ns[lite0.fingerprint]["quarantined"]] == [victim.name]
    assert (ns[lite0.fingerprint]["shards_ok"], ns[lite0.fingerprint]["rows_ok"]) == (1, 4)
    assert (ns[other.fingerprint]["shards_ok"], ns[other.fingerprint]["quarantined"]) == (1, [])
    assert (store / lite0.fingerprint / "quarantine" / victim.name).is_file()
    r, doc = _cache("info", "--store", str(store), "--json")
    assert {n["fingerprint"]: n["quarantined"] for n in doc["namespaces"]}[lite0.fingerprint] == 1
    # the store is sound again; the quarantine can go
    r, _ = _cache("verify", "--store", str(store))
    assert r.exit_code == 0 and r.output.rstrip().endswith("ok")
    r, doc = _cache("prune", "--quarantined", "--yes", "--store", str(store), "--json")
    assert r.exit_code == 0 and [x["why"] for x in doc["removed"]] == ["quarantined shards"]
    assert not (store / lite0.fingerprint / "quarantine").exists()
