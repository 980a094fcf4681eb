"""Reader / encoder / writer: the stages of embedding a list of files.

Readers (a thread pool: PIL, hashlib and ONNX Runtime release the GIL) hash and
decode files. On a CPU each reader then embeds the images it decoded with a
single-threaded ONNX Runtime call (``Encoder.for_readers``); on a GPU, or with
fewer readers than cores, the encoder runs whole batches on the calling thread
while the readers decode the next ones. A ``ShardWriter`` publishes shards to the
store. At most ``window`` tasks are in flight, so memory is flat however many
files there are.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from itertools import islice
from typing import TypeVar

import numpy as np

from featx.backbones.cards import Preprocess
from featx.embed.images import content_key, load_image, read_bytes
from featx.embed.runtime import READER_TASK, Encoder
from featx.embed.statcache import Stat, StatCache, stat_of
from featx.embed.store import EmbeddingStore, ShardWriter
from featx.engines.result import EmbedStats
from featx.errors import ImageError
from featx.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
HASH_TASK = 64  # files hashed per task

def bounded_map(fn: Callable[[T], R], items: Iterable[T], pool: Executor, window: int) -> Iterator[R]:
    """``pool.map`` in order, with at most ``window`` tasks submitted ahead."""
    it = iter(items)
    pending = deque(pool.submit(fn, x) for x in islice(it, window))
    while pending:
        fut = pending.popleft()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(fn, nxt))
        yield fut.result()


def chunks(seq: list[T], n: int) -> Iterator[list[T]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def to_embed(keys: list[str | None], stored: set[str]) -> list[int]:
    """Indices of the files to decode: the first file of each key not in the store yet."""
    out, seen = [], set()
    for i, k in enumerate(keys):
        if k is not None and k not in stored and k not in seen:
            seen.add(k)
            out.append(i)
    return out


def hash_file(path: str, cache: StatCache | None = None) -> tuple[str | None, str | None, Stat | None]:
    """(key, None, stat) or (None, reason, stat); a matching stat record skips reading."""
    st = stat_of(path)
    if cache is not None:
        key = cache.lookup(path, st)
        if key is not None:
            return key, None, st
    try:
        return content_key(read_bytes(path)), None, st
    except ImageError as e:
        return None, e.reason, st


def decode_batch(items: Sequence[tuple], pre: Preprocess, draft: bool = True):
    """Decode one batch of (index, path, key[, stat]); returns ok indices, keys, pixels, failures.

    A key comes with the stat the file had when it was hashed: if the file's stat is the
    same after this read, these are the hashed bytes and the key stands (the stat cache's
    trust: size, mtime_ns, ctime_ns, inode, device). Otherwise the bytes are hashed again,
    so a key is always that of the bytes decoded. Hashing a camera JPEG costs about half
    of decoding it, so the second hash was a third of the readers' time.
    """
    idx, keys, arrays, failures = [], [], [], []
    for i, path, key, *rest in items:
        try:
            data = read_bytes(path)
            arrays.append(load_image(data, pre, name=path, draft=draft))
            idx.append(i)
            hashed_as = rest[0] if rest else None
            same = key and hashed_as is not None and stat_of(path) == hashed_as
            keys.append(key if same else content_key(data))
        except ImageError as e:
            failures.append((i, e.reason))
        except Exception as e:  # a decoder bug must not end the run
            failures.append((i, f"unexpected decoder error: {type(e).__name__}: {e}"))
    s = pre.input_size
    pixels = np.stack(arrays) if arrays else np.zeros((0, s, s, 3), np.uint8)
    return idx, keys, pixels, failures


NON_FINITE = "the backbone gave a NaN or inf embedding for this image; it was not stored"


class FileOutcomes:
    """Per-file results of an embedding run, shared by the engines.

    ``keys[i]`` is file i's content key (None once it failed), ``failures[i]`` its reason.
    A file that fails after hashing takes its byte-identical copies down with it
    (``drop_failed_copies``): they were never decoded, since their key was embedded once.
    """

    def __init__(self, keys: list[str | None], failures: dict[int, str] | None = None) -> None:
        self.keys = keys
        self.failures: dict[int, str] = dict(failures or {})
        self._failed_keys: dict[str, str] = {}

    def fail(self, i: int, why: str) -> None:
        k = self.keys[i]
        if k is not None:
            self._failed_keys[k] = why
        self.keys[i] = None
        self.failures[i] = why

    def store(self, writer: ShardWriter, idx: Sequence[int], keys: Sequence[str],
              embeddings: np.ndarray) -> int:
        """Hand embedded rows to ``writer``; a row refused as NaN/inf fails its file.

        ``keys`` are those of the bytes actually decoded; returns how many rows were accepted.
        """
        refused = set(writer.add(list(keys), embeddings))
        for j, (i, k) in enumerate(zip(idx, keys, strict=True)):
            if j in refused:
                self.fail(i, NON_FINITE)
            else:
                self.keys[i] = k
        return len(idx) - len(refused)

    def drop_failed_copies(self) -> None:
        for j, k in enumerate(self.keys):
            if k is not None and k in self._failed_keys:
                self.keys[j] = None
                self.failures[j] = self._failed_keys[k]

    def failure_list(self, names: Sequence[str]) -> list[tuple[str, str]]:
        """(name of the file, reason) in file order."""
        return [(names[i], self.failures[i]) for i in sorted(self.failures)]


def _hash_all(files: list[str], pool: Executor, workers: int, stat_cache: StatCache | None,
              progress: ProgressFn) -> tuple[FileOutcomes, list[Stat | None]]:
    """Content key of every file (a matching stat record skips reading it)."""
    out = FileOutcomes([None] * len(files))
    stats_of: list[Stat | None] = [None] * len(files)
    progress("hash", 0, len(files))
    # HASH_TASK files per task: one future per file cost more than a stat-cache hit itself
    hashed = bounded_map(lambda part: [hash_file(f, stat_cache) for f in part], chunks(files, HASH_TASK),
                         pool, window=workers * 4)
    i = 0
    for part in hashed:
        for key, why, st in part:
            out.keys[i], stats_of[i] = key, st
            if why is not None:
                out.failures[i] = why
            i += 1
        progress("hash", i, len(files))
    return out, stats_of


def _timed(encoder: Encoder, pixels: np.ndarray) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    emb = encoder(pixels)
    return emb, time.perf_counter() - t


def embedded_batches(todo: Sequence[tuple], encoder: Encoder, pool: Executor, workers: int,
                     batch_size: int, draft: bool = True) -> Iterator[tuple]:
    """(ok indices, keys, embeddings, model seconds, failures) for each batch of ``todo``, in order.

    The schedule is ``Encoder.for_readers``': on a CPU the readers embed tasks of
    ``READER_TASK`` images themselves (small, so the last tasks of a run leave no core
    idle for long); otherwise this thread embeds whole batches as the readers decode them.
    """
    pre = encoder.backbone.preprocess
    twin = encoder.for_readers(workers)
    if twin is not None:
        def task(batch: Sequence[tuple]) -> tuple:
            idx, keys, pixels, fails = decode_batch(batch, pre, draft)
            return (idx, keys, *_timed(twin, pixels), fails)

        yield from bounded_map(task, chunks(todo, min(batch_size, READER_TASK)), pool, window=2 * workers)
        return
    decoded = bounded_map(lambda b: decode_batch(b, pre, draft), chunks(todo, batch_size), pool,
                          window=workers + 2)
    for idx, keys, pixels, fails in decoded:
        yield (idx, keys, *_timed(encoder, pixels), fails)


def _embed_todo(todo: list[tuple[int, str, str, Stat | None]], out: FileOutcomes, encoder: Encoder,
                writer: ShardWriter, pool: Executor, workers: int, batch_size: int, draft: bool,
                stats: EmbedStats, progress: ProgressFn) -> None:
    """Decode and embed the files in ``todo`` into ``writer`` (``embedded_batches``)."""
    progress("embed", 0, len(todo))
    done = 0
    for idx, bkeys, emb, seconds, fails in embedded_batches(todo, encoder, pool, workers, batch_size, draft):
        for i, why in fails:
            out.fail(i, why)
        stats.seconds_model += seconds  # summed over the threads that ran the model
        if len(idx):
            stats.embedded += out.store(writer, idx, bkeys, emb)
        done += len(idx) + len(fails)
        progress("embed", done, len(todo))


def embed_files(files: list[str], encoder: Encoder, store: EmbeddingStore, *,
                batch_size: int = 32, workers: int | None = None, draft: bool = True,
                shard_size: int = 2048, flush_seconds: float = 10.0,
                stat_cache: StatCache | None = None,
                progress: ProgressFn = no_progress) -> tuple[list[str | None], EmbedStats]:
    """Make sure every readable file has an embedding in ``store``.

    Returns each file's content key (None where it failed) and statistics;
    failures are (file, reason), in file order. Keys already in the store are
    checked there (``EmbeddingStore.stored``), so the rows of a damaged shard are
    recomputed. Shards of ``shard_size`` rows are written as the run goes; on an
    error or KeyboardInterrupt the embeddings done so far are flushed before it propagates.
    """
    workers = workers or max(1, os.cpu_count() or 1)
    stats = EmbedStats(files=len(files))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="featx-read") as pool:
        try:
            out, stats_of = _hash_all(files, pool, workers, stat_cache, progress)
            stats.seconds_hash = time.perf_counter() - t0
            have = store.stored(k for k in out.keys if k is not None)
            todo = [(i, files[i], out.keys[i], stats_of[i]) for i in to_embed(out.keys, have)]
            stats.cached = sum(1 for k in out.keys if k is not None) - len(todo)
            t1 = time.perf_counter()
            # the writer flushes when the block ends, even by Ctrl-C: keep what is embedded
            with ShardWriter(store, shard_size, flush_seconds) as writer:
                _embed_todo(todo, out, encoder, writer, pool, workers, batch_size, draft, stats, progress)
            stats.seconds_embed = time.perf_counter() - t1
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    out.drop_failed_copies()
    stats.failures = out.failure_list(files)
    if stat_cache is not None:
        stat_cache.save({f: (st, k) for f, st, k in zip(files, stats_of, out.keys, strict=True)
                         if k is not None and st is not None})
    return out.keys, stats
