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
    """UTF-8 strings (``binary``: bytes) as an Arrow array; None is null.

    ``string``/``binary`` (32-bit offsets) as featx's schemas have them, up to 2 GiB of text.
    """
    data = [b"" if v is None else v if isinstance(v, bytes) else v.encode("utf-8") for v in values]
    offsets = np.zeros(len(data) + 1, np.int64)
    np.cumsum([len(b) for b in data], out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError(f"{offsets[-1]} bytes of strings in one column chunk (at most 2 GiB)")
    nulls = [v is None for v in values]
    validity = pa.py_buffer(np.packbits(~np.array(nulls, bool), bitorder="little")) if any(nulls) else None
    buffers = [validity, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(data))]
    return pa.Array.from_buffers(pa.binary() if binary else pa.string(), len(data), buffers,
                                 null_count=sum(nulls))


_NUMPY = {pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
          pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.uint64(): np.uint64,
          pa.float16(): np.float16, pa.float32(): np.float32, pa.float64(): np.float64}


def numbers(values: Sequence[int] | np.ndarray, type: pa.DataType) -> pa.Array:
    """Non-null numbers as an Arrow array of ``type`` (any integer or float width)."""
    arr = np.ascontiguousarray(np.asarray(values, dtype=_NUMPY[type]))
    return pa.Array.from_buffers(type, len(arr), [None, pa.py_buffer(arr)])


def embedding_type(dim: int) -> pa.FixedSizeListType:
    """The embedding column's type: ``dim`` float32 values a row, none of them null.

    Non-null values let Parquet skip a definition level per value: a 50,000 x 4,880 table
    decodes in about 0.6x the CPU time of a nullable one. Readers accept either.
    """
    return pa.list_(pa.field("element", pa.float32(), nullable=False), dim)


def embeddings(emb: np.ndarray) -> pa.FixedSizeListArray:
    """float32 (N, dim) rows as a fixed-size-list column."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    flat = pa.Array.from_buffers(pa.float32(), emb.size, [None, pa.py_buffer(emb)])
    return pa.FixedSizeListArray.from_arrays(flat, type=embedding_type(emb.shape[1]))


def float32_values(arr: pa.Array) -> np.ndarray:
    """A null-free numeric array's values as float32 numpy (zero-copy where float32)."""
    if arr.type not in _NUMPY:
        raise TypeError(f"expected numbers, got {arr.type}")
    dtype = np.dtype(_NUMPY[arr.type])
    values = np.frombuffer(arr.buffers()[1], dtype, count=len(arr), offset=arr.offset * dtype.itemsize)
    return values.astype(np.float32, copy=False)


def offsets_and_data(arr: pa.Array) -> tuple[np.ndarray, memoryview]:
    """A string or binary array's int64 offsets (``len + 1``, from 0) and its bytes."""
    large = arr.type in (pa.large_string(), pa.large_binary())
    _, off, data = arr.buffers()
    o = np.frombuffer(off, np.int64 if large else np.int32, count=len(arr) + 1,
                      offset=arr.offset * (8 if large else 4)).astype(np.int64)
    raw = memoryview(data)[o[0]:o[-1]] if data is not None else memoryview(b"")
    return o - o[0], raw


def table(columns: dict[str, pa.Array], metadata: dict[bytes, bytes] | None = None) -> pa.Table:
    """A table of ``columns`` (name -> array), with schema ``metadata``."""
    t = pa.Table.from_arrays(list(columns.values()), names=list(columns))
    return t.replace_schema_metadata(metadata) if metadata else t
