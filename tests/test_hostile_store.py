"""A damaged or tampered embedding store is never served: each damage kind is found, the shard is
moved to quarantine/ with a warning naming it, its rows are recomputed, and the result is correct.

Real backbone (the ``lite0`` fixture), real photos, real Parquet files damaged the way disks,
killed processes and hostile users damage them.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from featx.cli import main
from featx.embed.store import EmbeddingStore
from featx.errors import FeatXError, StoreError
from featx.extract import extract


@pytest.fixture
def two_shards(image_folder, lite0, tmp_path):
    """A store holding the 8 photos in two shards of 4 rows, and the table they give."""
    store = tmp_path / "s"
    ref = extract(image_folder, lite0, store=store, device="cpu", write=False, batch_size=4,
                  shard_size=4)
    shards = sorted((store / lite0.fingerprint).glob("shard-*.parquet"))
    assert [pq.ParquetFile(p).metadata.num_rows for p in shards] == [4, 4]
    return store, ref, shards[0]


def _middle_of_embeddings(path) -> int:
    """File offset of the middle of the embedding column chunk (dictionary page + data pages)."""
    col = pq.ParquetFile(path).metadata.row_group(0).column(1)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    assert start + col.total_compressed_size < path.stat().st_size
    return start + col.total_compressed_size // 2


def _rerun_recomputes(image_folder, lite0, store, ref, victim, caplog):
    """Extract again: the damaged shard is quarantined and named, its 4 rows are recomputed."""
    with caplog.at_level(logging.WARNING, logger="featx"):
        again = extract(image_folder, lite0, store=store, device="cpu", write=False)
    assert again.table.keys == ref.table.keys
    np.testing.assert_allclose(again.table.X, ref.table.X, rtol=1e-5, atol=1e-6)
    assert np.isfinite(again.table.X).all()
    assert again.stats.embedded == 4 and again.stats.cached == 4 and not again.stats.failures
    assert not victim.exists()
    assert (store / lite0.fingerprint / "quarantine" / victim.name).is_file()
    assert victim.name in caplog.text and "quarantine" in caplog.text
    # the recomputed rows are in the store again: a third run embeds nothing
    third = extract(image_folder, lite0, store=store, device="cpu", write=False)
    assert third.stats.embedded == 0 and third.stats.cached == 8
    return again


def test_garbage_bytes_shard(two_shards, image_folder, lite0, caplog):
    store, ref, victim = two_shards
    victim.write_bytes(np.random.default_rng(0).bytes(victim.stat().st_size))
    _rerun_recomputes(image_folder, lite0, store, ref, victim, caplog)


def test_zero_byte_shard(two_shards, image_folder, lite0, caplog):
    store, ref, victim = two_shards
    victim.write_bytes(b"")
    _rerun_recomputes(image_folder, lite0, store, ref, victim, caplog)


def test_truncated_shard(two_shards, image_folder, lite0, caplog):
    store, ref, victim = two_shards
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    _rerun_recomputes(image_folder, lite0, store, ref, victim, caplog)


def test_wrong_schema_shard(two_shards, image_folder, lite0, caplog):
    store, ref, victim = two_shards
    keys = pq.read_table(victim).column("key").to_pylist()
    pq.write_table(pa.table({"id": keys, "vector": [[0.5] * 8] * len(keys)}), victim)
    _rerun_recomputes(image_folder, lite0, store, ref, victim, caplog)


def test_flipped_bytes_inside_shard(two_shards, image_folder, lite0, caplog):
    """64 flipped bytes in the middle of the embedding data: page CRC / checksum catch them."""
    store, ref, victim = two_shards
    mid = _middle_of_embeddings(victim)
    data = bytearray(victim.read_bytes())
    for i in range(64):
        data[mid + i] ^= 0xFF
    victim.write_bytes(bytes(data))
    _rerun_recomputes(image_folder, lite0, store, ref, victim, caplog)


def test_rewritten_values_with_intact_file(two_shards, image_folder, lite0, caplog):
    """A well-formed Parquet file with the shard's own footer but other numbers: the checksum."""
    store, ref, victim = two_shards
    t = pq.read_table(victim)
    emb = np.array(t.column("embedding").combine_chunks().flatten(), np.float32).reshape(len(t), -1)
    forged = pa.FixedSizeListArray.from_arrays(pa.array((emb * 1.5).reshape(-1)), emb.shape[1])
    pq.write_table(t.set_column(1, "embedding", forged), victim)  # keeps the schema metadata
    _rerun_recomputes(image_folder, lite0, store, ref, victim, caplog)


def test_wrong_dim_shard(two_shards, image_folder, lite0, caplog):
    """Rows 2560 wide in a 1280-dim namespace (the old reader reshaped them into wrong rows)."""
    store, ref, victim = two_shards
    t = pq.read_table(victim)
    emb = np.array(t.column("embedding").combine_chunks().flatten(), np.float32).reshape(len(t), -1)
    wide = np.concatenate([emb, emb], axis=1)
    pq.write_table(pa.table({"key": t.column("key"), "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(wide.reshape(-1)), wide.shape[1])}), victim)
    _rerun_recomputes(image_folder, lite0, store, ref, victim, caplog)


def test_non_finite_values_in_shard(two_shards, image_folder, lite0, caplog):
    store, ref, victim = two_shards
    t = pq.read_table(victim)
    emb = np.array(t.column("embedding").combine_chunks().flatten(), np.float32).reshape(len(t), -1)
    emb[1, 7] = np.nan
    pq.write_table(pa.table({"key": t.column("key"), "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(emb.reshape(-1)), emb.shape[1])}), victim)
    _rerun_recomputes(image_folder, lite0, store, ref, victim, caplog)


def test_damaged_shard_found_by_predict_path(two_shards, image_folder, lite0, caplog):
    """The same check guards featx.engines.files.embed_paths (a process-wide store): no stale rows."""
    from featx.engines.files import embed_paths

    store, ref, victim = two_shards
    victim.write_bytes(b"PAR1 not really")
    files = [str(image_folder / p) for p in ref.table.paths]
    with caplog.at_level(logging.WARNING, logger="featx"):
        X, ok, failures = embed_paths(files, lite0, device="cpu", store=store)
    assert ok == list(range(8)) and not failures
    np.testing.assert_allclose(X, ref.table.X, rtol=1e-5, atol=1e-6)
    assert victim.name in caplog.text


@pytest.mark.parametrize("content", [b"\x00\xff garbage", b"[1, 2, 3]", b'{"featx_store_format": "1"}'])
def test_tampered_format_file_is_a_clear_error(lite0, tmp_path, content):
    root = tmp_path / "s"
    EmbeddingStore(lite0, root)
    (root / "FORMAT").write_bytes(content)
    with pytest.raises(StoreError, match="FORMAT"):
        EmbeddingStore(lite0, root)


@pytest.mark.parametrize("content", [b"{not json", b'"a string"', b'{"dim": "wide"}'])
def test_tampered_meta_file_is_a_clear_error(lite0, tmp_path, image_folder, content):
    root = tmp_path / "s"
    EmbeddingStore(lite0, root)
    (root / lite0.fingerprint / "meta.json").write_bytes(content)
    with pytest.raises(FeatXError, match=r"meta\.json"):
        EmbeddingStore(lite0, root)
    # --features last: the namespace tampered with above is the last export's (extract defaults to multi)
    r = CliRunner().invoke(main, ["extract", str(image_folder), "--features", "last", "--store", str(root), "--device", "cpu",
                                  "--out", str(tmp_path / "t.parquet")])
    assert r.exit_code == 1 and "meta.json" in r.output
    assert isinstance(r.exception, SystemExit)  # a featx error, rendered; not a traceback


def test_stale_temporaries_of_killed_runs_are_removed(lite0, tmp_path):
    root = tmp_path / "s"
    ns = root / lite0.fingerprint
    ns.mkdir(parents=True)
    old = time.time() - 3 * 86400
    stale = [ns / ".shard-1.parquet.abcd1234.featx-tmp", ns / ".tmp-shard-2.parquet",
             root / ".FORMAT.x1y2.featx-tmp"]
    fresh = ns / ".shard-3.parquet.efgh5678.featx-tmp"  # a writer busy right now: kept
    for p in [*stale, fresh]:
        p.write_bytes(b"half a shard")
    for p in stale:
        os.utime(p, (old, old))
    EmbeddingStore(lite0, root)
    assert [p.exists() for p in stale] == [False, False, False]
    assert fresh.exists()


def _nan_backbone(tmp_path):
    """A real (tiny) ONNX backbone: log of each channel's mean, so a black image gives -inf."""
    import onnx
    from onnx import TensorProto, helper

    from featx.backbones.cards import Preprocess
    from featx.backbones.resolve import resolve_backbone

    s = 32
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
         helper.make_node("Log", ["m"], ["y"])],
        "log_mean", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, s, s])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "logmean.onnx"
    onnx.save(model, str(path))
    return resolve_backbone(path, preprocess=Preprocess(input_size=s, resize_size=s,
                                                        mean=(0, 0, 0), std=(1, 1, 1)))


def test_non_finite_embeddings_are_refused_and_the_file_named(image_folder, tmp_path):
    bb = _nan_backbone(tmp_path)
    Image.new("RGB", (40, 40), (0, 0, 0)).save(image_folder / "thing" / "black.png")
    (image_folder / "cat" / "black_copy.png").write_bytes((image_folder / "thing" / "black.png").read_bytes())
    r = extract(image_folder, bb, store=tmp_path / "s", out=tmp_path / "t.parquet", device="cpu")
    assert len(r.table) == 8 and np.isfinite(r.table.X).all()
    reasons = dict(r.stats.failures)
    assert set(reasons) == {"thing/black.png", "cat/black_copy.png"}
    assert all("NaN or inf" in why for why in reasons.values())
    report = json.loads(r.report.read_text())
    assert {f["path"] for f in report["failures"]} == {"thing/black.png", "cat/black_copy.png"}
    # nothing non-finite reached the store, and the good rows did
    st = EmbeddingStore(bb, tmp_path / "s")
    assert st.keys() == set(r.table.keys)


def test_non_finite_arrays_are_refused_naming_the_image(tmp_path):
    from featx.engines.files import embed_arrays

    bb = _nan_backbone(tmp_path)
    imgs = [np.full((40, 40, 3), 200, np.uint8), np.zeros((40, 40, 3), np.uint8)]
    with pytest.raises(FeatXError, match=r"image 1\b.*NaN or inf"):
        embed_arrays(imgs, bb, device="cpu", store=tmp_path / "s")
    # the good image was stored; the bad one was not
    st = EmbeddingStore(bb, tmp_path / "s")
    assert len(st.keys()) == 1


def test_a_shard_from_a_newer_featx_is_refused_not_quarantined(lite0, tmp_path, monkeypatch):
    """The footer's version was written and never read: a newer featx's shard in a shared store
    would have been read by the old rules."""
    import featx.embed.store as store_mod
    from featx.embed.store import NewerShardError, read_shard

    keys = [f"{i:064x}" for i in range(3)]
    X = np.random.default_rng(0).standard_normal((3, lite0.dim)).astype(np.float32)
    monkeypatch.setattr(store_mod, "SHARD_META_VERSION", store_mod.SHARD_META_VERSION + 1)
    shard = EmbeddingStore(lite0, tmp_path / "s").write(keys, X)
    monkeypatch.undo()
    with pytest.raises(NewerShardError, match=f"{shard.name}: written by a newer featx") as e:
        read_shard(shard, lite0.dim)
    assert e.value.path == shard
    with pytest.raises(StoreError, match="newer featx"):
        EmbeddingStore(lite0, tmp_path / "s").get(keys)
    assert shard.is_file() and not (shard.parent / "quarantine").exists()
    r = CliRunner().invoke(main, ["cache", "verify", "--store", str(tmp_path / "s")])
    assert r.exit_code != 0 and "newer featx" in r.output and r.output.count("\n") <= 2, r.output
    assert shard.is_file()
