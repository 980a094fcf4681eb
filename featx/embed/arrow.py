"""Arrow arrays built from their buffers.

``pa.array`` and ``pa.table`` import pandas wherever it is installed, to check whether
their input is a pandas object: 0.4-0.5 s, paid by every featx command that writes a
store shard, a table or the stat cache, in the middle of its work. These builders take
numpy arrays and Python strings straight to Arrow buffers and never ask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa


def strings(values: Sequence[str | bytes | None], binary: bool = False) -> pa.Array:
    """UTF-8 strings (``binary``: bytes) as an Arrow array; None is null."""
    data = [b"" if v is None else v if isinstance(v, bytes) else v.encode("utf-8") for v in values]
    offsets = np.zeros(len(data) + 1, np.int64)
    np.cumsum([len(b) for b in data], out=offsets[1:])
    nulls = [v is None for v in values]
    validity = pa.py_buffer(np.packbits(~np.array(nulls, bool), bitorder="little")) if any(nulls) else None
    kind = pa.large_binary() if binary else pa.large_string()
    arr = pa.Array.from_buffers(kind, len(data), [validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))],
                                null_count=sum(nulls))
    return arr.cast(pa.binary() if binary else pa.string())


def numbers(values: Sequence[int] | np.ndarray, type: pa.DataType) -> pa.Array:
    """Non-null integers or floats of Arrow type ``type``."""
    arr = np.ascontiguousarray(np.asarray(values, dtype=type.to_pandas_dtype()))
    return pa.Array.from_buffers(type, len(arr), [None, pa.py_buffer(arr)])


def embeddings(emb: np.ndarray) -> pa.FixedSizeListArray:
    """float32 (N, dim) rows as a fixed-size-list column."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    flat = pa.Array.from_buffers(pa.float32(), emb.size, [None, pa.py_buffer(emb)])
    return pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])


def float32_values(arr: pa.Array) -> np.ndarray:
    """A null-free numeric array's values as float32 numpy (zero-copy where already float32)."""
    if arr.type != pa.float32():
        arr = arr.cast(pa.float32())
    return np.frombuffer(arr.buffers()[1], np.float32, count=len(arr), offset=arr.offset * 4)


def table(columns: dict[str, pa.Array], metadata: dict[bytes, bytes] | None = None) -> pa.Table:
    t = pa.Table.from_arrays(list(columns.values()), names=list(columns))
    return t.replace_schema_metadata(metadata) if metadata else t
