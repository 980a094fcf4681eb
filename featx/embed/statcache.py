"""Remembers each file's content key by (size, mtime, inode), so unchanged files are not re-read.

Like git's index: a file whose stat matches the record keeps its key; anything
else is hashed again. It is only a shortcut: the decoder re-hashes the bytes it
actually embeds, so a stale record cannot put a wrong embedding in the store.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from featx.embed.scan import is_utf8

Stat = tuple[int, int, int]  # size, mtime_ns, inode


def stat_of(path: str) -> Stat | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


class StatCache:
    """Per-folder record of path -> (stat, key), kept beside the embedding store."""

    def __init__(self, store_root: Path, data_root: str | os.PathLike) -> None:
        tag = hashlib.blake2b(str(Path(data_root).resolve()).encode(), digest_size=8).hexdigest()
        self.path = Path(store_root) / "statcache" / f"{tag}.parquet"
        self.entries: dict[str, tuple[Stat, str]] = {}
        try:
            t = pq.ParquetFile(self.path).read().to_pydict()
            for p, sz, mt, ino, k in zip(t["path"], t["size"], t["mtime_ns"], t["inode"], t["key"], strict=True):
                self.entries[p] = ((sz, mt, ino), k)
        except Exception:  # missing or unreadable: start empty, it is only a cache
            self.entries = {}

    def lookup(self, path: str, st: Stat | None) -> str | None:
        e = self.entries.get(path)
        return e[1] if e is not None and st is not None and e[0] == st else None

    def save(self, records: dict[str, tuple[Stat, str]]) -> None:
        """Replace the record with ``records`` (this run's files), atomically; failures are ignored."""
        if not records:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            paths = [p for p in records if is_utf8(p)]  # Parquet text holds UTF-8 names; others are re-read
            if not paths:
                return
            cols = list(zip(*(records[p][0] for p in paths), strict=True))
            t = pa.table({"path": paths, "size": pa.array(cols[0], pa.int64()),
                          "mtime_ns": pa.array(cols[1], pa.int64()), "inode": pa.array(cols[2], pa.uint64()),
                          "key": [records[p][1] for p in paths]})
            tmp = self.path.with_name(f".{uuid.uuid4().hex}.tmp")
            pq.write_table(t, tmp)
            os.replace(tmp, self.path)
        except OSError:
            pass
