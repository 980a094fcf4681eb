"""Out-of-core head: logistic regression by SGD over embedding tables larger than memory.

``fit_streaming_head`` holds a few shards of rows at most, whatever the table's
size. It makes one pass over the table(s) that fits a StandardScaler by
``partial_fit`` and, at the same time, spills every row to a random one of at most
``MAX_BUCKETS`` bucket files (Arrow IPC) in a scratch directory (an external shuffle: featx
tables are in folder order, i.e. sorted by class, and SGD fed one class at a time
forgets the others); rows wait in per-bucket buffers of four shards in all, so the
files get few, large record batches of at most ``shard_rows`` rows. Each epoch then
visits the buckets in a random order and reads each one ``shard_rows`` rows at a
time, from batches drawn in random order (a bucket's rows arrive in table order),
shuffles them and calls ``SGDClassifier(loss="log_loss").partial_fit`` for every
candidate ``alpha``; a held-out split, also read chunk by chunk, picks the alpha, the
streaming analogue of choosing C by CV.

The result is ``Pipeline([("scaler", StandardScaler), ("clf", SGDClassifier)])``
trained on class codes 0..K-1, like ``featx.heads.fit``; the class names are in the
report.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featx.embed.table import META_KEY, parse_meta
from featx.errors import FeatXError, MismatchError
from featx.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)

ALPHAS = (1e-4, 1e-3, 1e-2)
# At most this many bucket files, whatever the table's size: one writer is open per
# bucket during the shuffle (a million-row bucket count would pass the open-file limit)
MAX_BUCKETS = 256

@dataclass
class StreamHeadReport:
    """What ``fit_streaming_head`` did; ``classes[j]`` is class code ``j``."""

    classes: list[str]
    rows: int
    train_rows: int
    val_rows: int
    dim: int
    epochs: int
    alpha: float
    val_accuracy: float | None
    curve: dict[str, list[float]]  # alpha -> held-out accuracy after each epoch
    buckets: int
    max_rows_in_memory: int
    seconds: float
    fingerprint: str
    backbone: str
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def table_files(path: str | os.PathLike) -> list[Path]:
    """The Parquet files of a featx table: the file itself, or ``*.parquet`` under a directory."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet") if not f.name.startswith("."))
        if not files:
            raise FeatXError(f"{p}: no .parquet files in this directory; run `featx extract` first")
        return files
    if not p.is_file():
        raise FeatXError(f"{p}: no such embeddings table; run `featx extract` first")
    return [p]


def table_meta(path: str | os.PathLike) -> dict:
    """featx metadata of a table (file or directory) from the Parquet schemas alone, no rows read."""
    return _check_schemas(table_files(path))


def _check_schemas(files: list[Path]) -> dict:
    """Validate every file's columns and that all come from one backbone; return the metadata."""
    meta: dict = {}
    for f in files:
        try:
            schema = pq.read_schema(f)
        except Exception as e:
            raise FeatXError(f"{f}: not a readable Parquet file ({e})") from None
        missing = {"label", "embedding"} - set(schema.names)
        if missing:
            raise FeatXError(f"{f}: not a labelled featx embeddings table (missing {sorted(missing)}); "
                             "extract an ImageFolder (root/<class>/<image>) to get labels")
        raw = (schema.metadata or {}).get(META_KEY)
        m = parse_meta(raw, f)
        if meta and m.get("fingerprint") != meta.get("fingerprint"):
            raise MismatchError(f"{f}: embeddings of backbone {m.get('fingerprint')}, but {files[0]} has "
                                f"{meta.get('fingerprint')}; a head is trained on one backbone's embeddings")
        meta = meta or m
    return meta


def _chunks(files: list[Path], rows: int) -> Iterator[pa.RecordBatch]:
    """The label and embedding columns of ``files``, in order, ``rows`` at a time at most.

    One row group is decoded at a time. The dataset scanner and ``iter_batches`` kept every
    row group they had read alive until the file ended (pyarrow 26: ~5 KB a 1,280-dim row,
    11.7 GB of a 1M-row table's shuffle pass), so memory grew with the table.
    """
    for f in files:
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            for batch in pf.read_row_group(g, columns=["label", "embedding"]).to_batches(max_chunksize=rows):
                if batch.num_rows:
                    yield batch


def _embeddings(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    dim = col.type.list_size
    # flatten() honours a sliced batch's offset; .values would return the whole buffer
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def _check_args(epochs: int, shard_rows: int, validation_fraction: float,
                alphas: Sequence[float]) -> list[float]:
    if epochs < 1:
        raise FeatXError(f"epochs must be >= 1, got {epochs}")
    if shard_rows < 1:
        raise FeatXError(f"shard_rows must be >= 1, got {shard_rows}")
    if not 0 < validation_fraction < 0.5:
        raise FeatXError(f"validation_fraction must be in (0, 0.5), got {validation_fraction}")
    out = [float(a) for a in alphas]
    if not out or any(not a > 0 for a in out):
        raise FeatXError(f"alphas must be positive numbers, got {out}")
    return out


@dataclass
class _Shuffled:
    """Pass 1's result: scaler statistics, class names, rows per bucket (the last is held out)."""

    scaler: object
    classes: list[str]
    counts: np.ndarray
    max_rows: int
    shard_rows: int


def _shuffle_pass(path, files: list[Path], total: int, shard_rows: int, n_buckets: int,
                  validation_fraction: float, rng: np.random.Generator, scratch: Path,
                  progress: ProgressFn) -> _Shuffled:
    """Scaler statistics, class names, and the external shuffle into bucket files."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    labels: set[str] = set()
    # Arrow IPC bucket files, not Parquet: each open ParquetWriter holds ~5 MB of buffers for a
    # 1,280-dim column (256 buckets: 1.3 GB); an IPC writer writes each batch straight out
    writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
    counts = np.zeros(n_buckets + 1, np.int64)  # bucket n_buckets is the held-out split
    max_rows = seen = 0
    # rows wait in per-bucket buffers (4 shards in all) and leave as row groups of at least
    # 4 * shard_rows / buckets rows: linear in the rows, where a write per (batch, bucket)
    # pair made (N / shard_rows)^2 row groups
    pending: dict[int, list[pa.Table]] = {}
    pending_rows = np.zeros(n_buckets + 1, np.int64)

    def spill(b: int) -> None:
        part = pa.concat_tables(pending.pop(b))
        if b not in writers:
            writers[b] = pa.ipc.new_file(str(scratch / f"bucket-{b}.arrow"), part.schema)
        writers[b].write_table(part, max_chunksize=shard_rows)  # an epoch reads whole batches
        pending_rows[b] = 0

    try:
        for batch in _chunks(files, shard_rows):
            lab = batch.column("label")
            if lab.null_count:
                raise FeatXError(f"{path}: {lab.null_count} rows have no label; the head needs labelled "
                                 "embeddings (ImageFolder layout)")
            X = _embeddings(batch.column("embedding"))
            scaler.partial_fit(X)
            labels.update(lab.to_pylist())
            max_rows = max(max_rows, len(X))
            held = rng.random(len(X)) < validation_fraction
            where = np.where(held, n_buckets, rng.integers(0, n_buckets, len(X)))
            table = pa.Table.from_batches([batch])
            order = np.argsort(where, kind="stable")
            bounds = np.searchsorted(where[order], np.arange(n_buckets + 2))
            for b in np.flatnonzero(np.diff(bounds)):
                part = table.take(pa.array(order[bounds[b]:bounds[b + 1]]))
                pending.setdefault(int(b), []).append(part)
                pending_rows[b] += len(part)
                counts[b] += len(part)
            while pending_rows.sum() > 4 * shard_rows:
                spill(int(np.argmax(pending_rows)))
            seen += len(X)
            progress("shuffle", seen, total)
        for b in list(pending):
            spill(b)
    finally:
        for w in writers.values():
            w.close()
    classes = sorted(labels)
    if len(classes) < 2:
        raise FeatXError(f"{path}: only one class ({classes}); a classifier needs at least two")
    return _Shuffled(scaler, classes, counts, max_rows, shard_rows)


def _sgd_epochs(sh: _Shuffled, alphas: list[float], epochs: int, seed: int, scratch: Path,
                rng: np.random.Generator, progress: ProgressFn):
    """SGD epochs over the buckets, one in memory at a time; returns (models, curve, max_rows)."""
    from sklearn.linear_model import SGDClassifier

    n_buckets = len(sh.counts) - 1
    code = {c: i for i, c in enumerate(sh.classes)}
    codes = np.arange(len(sh.classes))

    def read_bucket(b: int, shuffle: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """A bucket ``shard_rows`` rows at a time; its row groups (each in table order, so
        sorted by class) are drawn in random order and their rows shuffled together."""
        f = pa.ipc.open_file(pa.OSFile(str(scratch / f"bucket-{b}.arrow")))  # read, not mapped
        groups = rng.permutation(f.num_record_batches) if shuffle else np.arange(f.num_record_batches)

        def chunk(picked: list[int]) -> tuple[np.ndarray, np.ndarray]:
            t = pa.Table.from_batches([f.get_batch(i) for i in picked])
            y = np.array([code[v] for v in t.column("label").to_pylist()], np.int64)
            X = sh.scaler.transform(_embeddings(t.column("embedding"))).astype(np.float32)
            if shuffle:
                order = rng.permutation(len(X))
                X, y = X[order], y[order]
            return X, y

        picked: list[int] = []
        rows = 0
        for g in groups:  # row groups hold at most shard_rows rows: so does every chunk
            n = f.get_batch(int(g)).num_rows
            if picked and rows + n > sh.shard_rows:
                yield chunk(picked)
                picked, rows = [], 0
            picked.append(int(g))
            rows += n
        if picked:
            yield chunk(picked)

    models = {a: SGDClassifier(loss="log_loss", alpha=a, average=True, random_state=seed) for a in alphas}
    curve: dict[str, list[float]] = {repr(a): [] for a in alphas}
    train_buckets = [b for b in range(n_buckets) if sh.counts[b]]
    max_rows = sh.max_rows
    for epoch in range(epochs):
        for j, b in enumerate(rng.permutation(train_buckets)):
            for X, y in read_bucket(int(b), shuffle=True):
                max_rows = max(max_rows, len(X))
                for m in models.values():
                    m.partial_fit(X, y, classes=codes)
            progress("epoch", epoch * len(train_buckets) + j + 1, epochs * len(train_buckets))
        if sh.counts[n_buckets]:
            right = dict.fromkeys(alphas, 0)
            for X, y in read_bucket(n_buckets, shuffle=False):  # held out: counted chunk by chunk
                max_rows = max(max_rows, len(X))
                for a, m in models.items():
                    right[a] += int((m.predict(X) == y).sum())
            for a in alphas:
                curve[repr(a)].append(right[a] / int(sh.counts[n_buckets]))
    return models, curve, max_rows


def fit_streaming_head(path: str | os.PathLike, *, epochs: int = 10,
                       alphas: Sequence[float] = ALPHAS, shard_rows: int = 4096,
                       validation_fraction: float = 0.1, seed: int = 0,
                       workdir: str | os.PathLike | None = None,
                       progress: ProgressFn = no_progress):
    """Fit scaler + SGD logistic regression on a table too large for memory.

    ``path``: a table written by ``featx extract`` or a directory of them (one
    backbone). ``shard_rows`` bounds the rows in memory at once; ``workdir`` holds
    the shuffled copy (one more copy of the table on disk, deleted at the end).
    Returns ``(pipeline, report)``.
    """
    from sklearn.pipeline import Pipeline

    alphas = _check_args(epochs, shard_rows, validation_fraction, alphas)
    t0 = time.perf_counter()
    files = table_files(path)
    meta = _check_schemas(files)
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if total == 0:
        raise FeatXError(f"{path}: the table has no rows")
    n_buckets = max(1, min(MAX_BUCKETS, math.ceil(total / shard_rows)))
    rng = np.random.default_rng(seed)
    scratch = Path(tempfile.mkdtemp(prefix="featx-sgd-", dir=workdir))
    try:
        sh = _shuffle_pass(path, files, total, shard_rows, n_buckets, validation_fraction, rng,
                           scratch, progress)
        models, curve, max_rows = _sgd_epochs(sh, alphas, epochs, seed, scratch, rng, progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if sh.counts[n_buckets]:
        best = max(alphas, key=lambda a: curve[repr(a)][-1])
        val_acc: float | None = curve[repr(best)][-1]
    else:  # a table too small to hold rows out: take the middle of the grid
        best, val_acc = sorted(alphas)[len(alphas) // 2], None
    pipe = Pipeline([("scaler", sh.scaler), ("clf", models[best])])
    report = StreamHeadReport(
        classes=sh.classes, rows=total, train_rows=int(sh.counts[:n_buckets].sum()),
        val_rows=int(sh.counts[n_buckets]), dim=int(sh.scaler.n_features_in_), epochs=epochs,
        alpha=best, val_accuracy=val_acc, curve=curve, buckets=n_buckets, max_rows_in_memory=max_rows,
        seconds=time.perf_counter() - t0, fingerprint=meta.get("fingerprint", ""),
        backbone=meta.get("backbone", ""), files=[str(f) for f in files])
    log.info("streaming head: alpha %g, held-out accuracy %s, %d rows in %d buckets",
             best, val_acc, total, n_buckets)
    return pipe, report
