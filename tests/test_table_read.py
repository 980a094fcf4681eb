"""Reading a featx table costs one matrix of memory and decodes without a null level per value.

suggest on a 50,000 x 4,880 pool spent most of its time reading the table: the Arrow table,
its combined copy and the matrix were all alive at once, and every one of the 244 million
values carried a Parquet definition level for a null that cannot occur."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featx.embed.table import EmbeddingTable, read_table, write_table
from featx.errors import FeatXError
from featx.heads import headfile
from featx.heads.fit import fit_head


def _table(path, n: int, dim: int, seed: int = 0):
    X = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    t = EmbeddingTable([f"img{i}.png" for i in range(n)], [str(i % 3) for i in range(n)],
                       [f"k{i}" for i in range(n)], X, {"dim": dim})
    # several row groups, as extract writes them
    return write_table(path, t, chunks=(X[i:i + 2048] for i in range(0, n, 2048))), X


def test_embedding_values_are_written_non_null(tmp_path):
    path, _ = _table(tmp_path / "t.featx.parquet", 10, 8)
    typ = pq.read_schema(path).field("embedding").type
    assert pa.types.is_fixed_size_list(typ) and typ.list_size == 8
    assert not typ.value_field.nullable


def test_a_table_with_nullable_values_still_reads_the_same(tmp_path):
    path, X = _table(tmp_path / "t.featx.parquet", 5000, 16)
    old = pq.read_table(path)
    nullable = pa.list_(pa.float32(), 16)  # what featx wrote before
    col = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), type=nullable)
    schema = old.schema.set(old.schema.get_field_index("embedding"), pa.field("embedding", nullable))
    legacy = tmp_path / "legacy.featx.parquet"
    pq.write_table(old.set_column(old.schema.get_field_index("embedding"), "embedding", col).cast(schema),
                   legacy, row_group_size=2048)
    a, b = read_table(path), read_table(legacy)
    np.testing.assert_array_equal(a.X, X)
    np.testing.assert_array_equal(b.X, X)
    assert a.paths == b.paths and a.keys == b.keys and a.labels == b.labels


def test_a_null_embedding_row_is_refused_naming_the_file(tmp_path):
    path, X = _table(tmp_path / "t.featx.parquet", 3, 4)
    t = pq.read_table(path)
    col = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), 4, mask=pa.array([False, True, False]))
    pq.write_table(t.set_column(t.schema.get_field_index("embedding"), "embedding", col), path)
    with pytest.raises(FeatXError, match=r"t\.featx\.parquet.*null"):
        read_table(path)


def test_reading_a_table_costs_one_matrix_of_memory(tmp_path):
    n, dim = 30_000, 1_280  # 154 MB of embeddings in 15 row groups
    path, _ = _table(tmp_path / "t.featx.parquet", n, dim)
    _table(tmp_path / "small.featx.parquet", 10, dim)
    code = textwrap.dedent(f"""
        import resource, sys
        from featx.embed.table import read_table
        read_table({str(tmp_path / "small.featx.parquet")!r})  # imports and pools warmed up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = read_table({str(path)!r})
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True).stdout)
    matrix = n * dim * 4
    # measured: 1.7x the matrix (one group's decoding buffers and the other columns beside it);
    # before, the whole Arrow table and its combined copy: 5.4x
    assert grown < 2.5 * matrix, f"reading a {matrix / 2**20:.0f} MiB table grew the peak by {grown / 2**20:.0f} MiB"


def test_head_proba_in_blocks_is_the_whole_matrix_result(monkeypatch):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((103, 12)).astype(np.float32)
    pipe, _ = fit_head(X, rng.integers(0, 3, 103), C=1.0)
    whole = pipe.predict_proba(X)
    monkeypatch.setattr(headfile, "PROBA_BLOCK", 10)
    blocks = headfile.proba_in_blocks(pipe, X)
    assert blocks.dtype == np.float64 and blocks.shape == whole.shape
    np.testing.assert_allclose(blocks, whole, rtol=0, atol=1e-12)
    assert headfile.proba_in_blocks(pipe, X[:0]).shape == (0, 3)
