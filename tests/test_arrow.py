"""featx.embed.arrow: Arrow columns built from buffers, so that no featx write imports pandas."""

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from featx.embed import arrow

from .helpers import make_image_folder


def test_strings_match_pa_array():
    values = ["a", "", None, "çà/ü 𝄞", "x" * 1000]
    got = arrow.strings(values)
    assert got.type == pa.string() and got.null_count == 1
    assert got.equals(pa.array(values, pa.string()))
    raw = [b"\xff\xfe", None, b""]
    assert arrow.strings(raw, binary=True).equals(pa.array(raw, pa.binary()))
    assert len(arrow.strings([])) == 0


def test_numbers_and_embeddings_round_trip():
    big = [0, 2**63 - 1, 5]
    assert arrow.numbers(big, pa.uint64()).to_pylist() == big
    assert arrow.numbers([-1, 3], pa.int64()).to_pylist() == [-1, 3]
    emb = np.random.default_rng(0).random((5, 7), dtype=np.float32)
    col = arrow.embeddings(emb)
    assert col.type == arrow.embedding_type(7) and col.type.list_size == 7 and not col.type.value_field.nullable
    np.testing.assert_array_equal(arrow.float32_values(col.flatten()).reshape(-1, 7), emb)
    part = col.flatten().slice(7, 14)  # an offset into the buffer
    np.testing.assert_array_equal(arrow.float32_values(part), emb[1:3].ravel())
    np.testing.assert_array_equal(arrow.float32_values(pa.array([1.5, 2.0], pa.float64())), [1.5, 2.0])
    assert len(arrow.embeddings(np.zeros((0, 7), np.float32))) == 0


def test_an_extract_does_not_import_pandas(tmp_path, featx_home):
    """pyarrow's pa.array imports pandas where it is installed (0.4-0.5 s): a first extract paid
    it in the middle of its run, when the first shard was written."""
    pytest.importorskip("pandas")
    root = make_image_folder(tmp_path / "data", per_class=2)
    code = (
        "import sys\n"
        "from featx.extract import extract\n"
        "for _ in range(2):  # embedding, then everything cached\n"
        f"    r = extract({str(root)!r}, out={str(tmp_path / 't.parquet')!r}, store={str(tmp_path / 's')!r})\n"
        "from featx.embed.table import read_table\n"
        f"assert len(read_table({str(tmp_path / 't.parquet')!r}).paths) == 4\n"
        "print(r.stats.cached, 'pandas' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FEATX_HOME": str(featx_home)})
    assert out.stdout.split() == ["4", "False"]


def test_embeddings_of_any_numeric_table_and_a_refusal(tmp_path):
    from featx.embed.store import DamagedShardError, embeddings_of

    for ty in (pa.float64(), pa.int64(), pa.float16()):
        t = pa.table({"embedding": pa.array([[1, 2], [3, 4]], pa.list_(ty, 2))})
        np.testing.assert_array_equal(embeddings_of(t), np.array([[1, 2], [3, 4]], np.float32))
    with pytest.raises(DamagedShardError, match="expected numbers"):
        embeddings_of(pa.table({"embedding": pa.array([["a", "b"]], pa.list_(pa.string(), 2))}))
