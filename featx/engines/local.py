"""Reader / encoder / writer: the stages of embedding a list of files.

Readers (a thread pool: PIL and hashlib release the GIL) hash and decode
files; the encoder runs batches through ONNX Runtime on the calling thread;
the writer flushes shards to the store. At most ``window`` batches are in
flight, so memory is flat however many files there are, and decoding of the
next batches overlaps with inference of the current one.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from itertools import islice
from typing import TypeVar

import numpy as np

from featx.backbones.cards import Preprocess
from featx.embed.images import content_key, load_image, read_bytes
from featx.embed.runtime import Encoder
from featx.embed.statcache import Stat, StatCache, stat_of
from featx.embed.store import EmbeddingStore
from featx.engines.result import EmbedStats, EngineRun, ExtractJob
from featx.errors import ImageError
from featx.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

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


def decode_batch(items: list[tuple[int, str, str]], pre: Preprocess, draft: bool = True):
    """Decode one batch of (index, path, key); returns ok indices, keys, pixels, failures."""
    idx, keys, arrays, failures = [], [], [], []
    for i, path, _ in items:
        try:
            data = read_bytes(path)
            arrays.append(load_image(data, pre, name=path, draft=draft))
            idx.append(i)
            keys.append(content_key(data))  # the bytes we decoded, even if the file changed since hashing
        except ImageError as e:
            failures.append((i, e.reason))
        except Exception as e:  # a decoder bug must not end the run
            failures.append((i, f"unexpected decoder error: {type(e).__name__}: {e}"))
    s = pre.input_size
    pixels = np.stack(arrays) if arrays else np.zeros((0, s, s, 3), np.uint8)
    return idx, keys, pixels, failures


def embed_files(files: list[str], encoder: Encoder, store: EmbeddingStore, *,
                batch_size: int = 32, workers: int | None = None, draft: bool = True,
                flush_rows: int = 2048, flush_seconds: float = 10.0,
                stat_cache: StatCache | None = None,
                progress: ProgressFn = no_progress) -> tuple[list[str | None], EmbedStats]:
    """Make sure every readable file has an embedding in ``store``.

    Returns each file's content key (None where it failed) and statistics;
    failures are (file, reason). On KeyboardInterrupt, the embeddings done so
    far are flushed to the store before it propagates.
    """
    workers = workers or max(1, os.cpu_count() or 1)
    stats = EmbedStats(files=len(files))
    keys: list[str | None] = [None] * len(files)
    pre = encoder.backbone.preprocess
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="featx-read") as pool:
        stats_of: list[Stat | None] = [None] * len(files)
        progress("hash", 0, len(files))
        hashed = bounded_map(lambda f: hash_file(f, stat_cache), files, pool, window=workers * 64)
        for i, (key, why, st) in enumerate(hashed):
            keys[i], stats_of[i] = key, st
            if why is not None:
                stats.failures.append((files[i], why))
            if (i + 1) % 256 == 0 or i + 1 == len(files):
                progress("hash", i + 1, len(files))
        stats.seconds_hash = time.perf_counter() - t0

        todo = [(i, files[i], keys[i]) for i in to_embed(keys, store.keys())]
        stats.cached = sum(1 for k in keys if k is not None) - len(todo)
        progress("embed", 0, len(todo))

        buf_keys: list[str] = []
        buf_emb: list[np.ndarray] = []
        last_flush = time.perf_counter()

        def flush() -> None:
            nonlocal buf_keys, buf_emb, last_flush
            if buf_keys:
                store.write(buf_keys, np.concatenate(buf_emb))
            buf_keys, buf_emb, last_flush = [], [], time.perf_counter()

        t1 = time.perf_counter()
        done = 0
        failed: dict[str | None, str] = {}
        try:
            batches = chunks(todo, batch_size)
            for idx, bkeys, pixels, fails in bounded_map(
                    lambda b: decode_batch(b, pre, draft), batches, pool, window=workers + 2):
                for i, why in fails:
                    failed[keys[i]] = why
                    keys[i] = None
                    stats.failures.append((files[i], why))
                for i, k in zip(idx, bkeys, strict=True):
                    keys[i] = k
                if len(pixels):
                    tm = time.perf_counter()
                    emb = encoder(pixels)
                    stats.seconds_model += time.perf_counter() - tm
                    buf_keys.extend(bkeys)
                    buf_emb.append(emb)
                    stats.embedded += len(bkeys)
                done += len(idx) + len(fails)
                progress("embed", done, len(todo))
                if len(buf_keys) >= flush_rows or time.perf_counter() - last_flush > flush_seconds:
                    flush()
        finally:
            # Ctrl-C or an error: keep what is already embedded
            flush()
            pool.shutdown(wait=False, cancel_futures=True)
        stats.seconds_embed = time.perf_counter() - t1
    for j, k in enumerate(keys):  # byte-identical copies of a file that failed to decode
        if k in failed:
            keys[j] = None
            stats.failures.append((files[j], failed[k]))
    if stat_cache is not None:
        stat_cache.save({f: (st, k) for f, st, k in zip(files, stats_of, keys, strict=True)
                         if k is not None and st is not None})
    return keys, stats


class LocalEngine:
    """Threads on this machine: readers decode while ONNX Runtime runs the model."""

    name = "local"

    def run(self, job: ExtractJob) -> EngineRun:
        """Embed ``job``'s files into its store; failures are paths relative to the root."""
        encoder = Encoder(job.backbone, device=job.device)
        files = [str(job.root / it.path) for it in job.found.items]
        keys, stats = embed_files(files, encoder, job.store, batch_size=job.batch_size,
                                  workers=job.workers, draft=job.draft, flush_rows=job.shard_size,
                                  progress=job.progress,
                                  stat_cache=StatCache(job.store.root, job.root))
        rel = {str(job.root / it.path): it.path for it in job.found.items}
        stats.failures = [(rel.get(p, p), why) for p, why in stats.failures]
        return EngineRun(keys, stats, encoder.provider)
