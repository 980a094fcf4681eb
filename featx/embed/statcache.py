"""Remembers each file's content key by its stat, so unchanged files are not re-read.

Like git's index: a record matches only when the file's size, mtime_ns, ctime_ns, inode
and device all equal the recorded ones; anything else is hashed again. ctime is what
catches an in-place edit that keeps size and mtime (``dd conv=notrunc`` then ``touch -r``):
any write, ``utime`` or ``chmod`` sets it to now, and no user call can set it back. The
price is a re-hash after a ``chmod``/``chown`` or a copy that does not keep ctime (it is
only a shortcut). Records written by earlier featx (without ctime and device) are ignored:
their files are hashed once more. A URL (``featx.embed.remote``) has no stat here: it is
read and hashed on every run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from featx.atomic import atomic_path, clean_stale_temporaries
from featx.embed import arrow
from featx.embed.remote import is_url
from featx.embed.scan import is_utf8

__all__ = ["Stat", "StatCache", "stat_of"]

Stat = tuple[int, int, int, int, int]  # size, mtime_ns, ctime_ns, inode, device
_COLUMNS = ("size", "mtime_ns", "ctime_ns", "inode", "device")
_TYPES = (pa.int64(), pa.int64(), pa.int64(), pa.uint64(), pa.uint64())


def stat_of(path: str) -> Stat | None:
    """The stat fields a record must match, or None if the file cannot be stat'ed.

    None for a URL, whatever a local file of that name holds: a URL is always hashed.
    """
    if is_url(path):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


class StatCache:
    """Per-folder record of path -> (stat, key), kept beside the embedding store."""

    def __init__(self, store_root: Path, data_root: str | os.PathLike) -> None:
        tag = hashlib.blake2b(str(Path(data_root).resolve()).encode(), digest_size=8).hexdigest()
        self.path = Path(store_root) / "statcache" / f"{tag}.parquet"
        self.entries: dict[str, tuple[Stat, str]] = {}
        try:
            t = pq.ParquetFile(self.path).read().to_pydict()
            stats = zip(*(t[c] for c in _COLUMNS), strict=True)
            for p, st, k in zip(t["path"], stats, t["key"], strict=True):
                self.entries[p] = (tuple(st), k)  # type: ignore[assignment]
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
            # missing, unreadable or from an earlier featx (no ctime): start empty, it is a cache
            self.entries = {}

    def lookup(self, path: str, st: Stat | None) -> str | None:
        """The recorded key of ``path`` if its stat ``st`` matches the record exactly."""
        e = self.entries.get(path)
        return e[1] if e is not None and st is not None and e[0] == st else None

    def _unchanged(self, records: dict[str, tuple[Stat, str]]) -> bool:
        e = self.entries
        return len(records) == len(e) and all(e.get(p) == r for p, r in records.items())

    def save(self, records: dict[str, tuple[Stat, str]]) -> None:
        """Replace the record with ``records`` (this run's files), atomically; failures are ignored."""
        if not records or self._unchanged(records):
            return  # a re-run over the same files: the record on disk is already this one
        with contextlib.suppress(OSError, ValueError, pa.ArrowException):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temporaries(self.path.parent)
            paths = [p for p in records if is_utf8(p)]  # Parquet text holds UTF-8 names; others are re-read
            if not paths:
                return
            cols = list(zip(*(records[p][0] for p in paths), strict=True))
            t = arrow.table({"path": arrow.strings(paths),
                             **{c: arrow.numbers(v, ty) for c, v, ty in zip(_COLUMNS, cols, _TYPES, strict=True)},
                             "key": arrow.strings([records[p][1] for p in paths])})
            with atomic_path(self.path) as tmp:
                pq.write_table(t, tmp)
