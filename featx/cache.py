"""Cache management: what the embedding store holds, trimming it, checking every shard.

``cache_info`` lists each backbone namespace (``<store>/<fingerprint>/``) with its size, rows,
shards and last use; ``prune_cache`` removes namespaces unused for a while or of one backbone
(a dry run unless ``dry_run=False``), or the quarantined shards; ``verify_cache`` reads and
checks every shard (checksums, dim, finite values), moves damaged ones to ``quarantine/``
and reports. Embeddings removed here are recomputed by the next run that needs them.

Last use is the time a run last opened the namespace (its ``LAST_USED`` file), or, for
stores written before featx recorded it, the newest shard.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from featx.embed.store import (
    LAST_USED,
    META,
    QUARANTINE,
    SHARD_GLOB,
    DamagedShardError,
    clean_temporaries,
    quarantine,
    read_namespace_meta,
    read_shard,
)
from featx.errors import FeatXError, StoreError
from featx.paths import default_store
from featx.progress import ProgressFn, no_progress

__all__ = ["CacheInfo", "NamespaceInfo", "PruneResult", "VerifyReport", "cache_info", "prune_cache",
           "verify_cache"]

log = logging.getLogger(__name__)


@dataclass
class NamespaceInfo:
    """One backbone's cached embeddings. ``backbone``/``dim`` are None if meta.json is unreadable."""

    fingerprint: str
    path: Path
    backbone: str | None
    dim: int | None
    shards: int
    rows: int
    bytes: int
    quarantined: int  # shard files in quarantine/
    last_used: float | None  # seconds since the epoch
    problem: str | None = None  # why meta.json or a footer could not be read

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "path": str(self.path), "backbone": self.backbone,
                "dim": self.dim, "shards": self.shards, "rows": self.rows, "bytes": self.bytes,
                "quarantined": self.quarantined, "last_used": self.last_used, "problem": self.problem}


@dataclass
class CacheInfo:
    """Every namespace of a store, largest first."""

    root: Path
    namespaces: list[NamespaceInfo]

    @property
    def bytes(self) -> int:
        return sum(n.bytes for n in self.namespaces)

    def to_dict(self) -> dict:
        return {"store": str(self.root), "bytes": self.bytes,
                "namespaces": [n.to_dict() for n in self.namespaces]}


def _root(store: str | os.PathLike | None) -> Path:
    return Path(store) if store is not None else default_store()


def _namespaces(root: Path) -> list[Path]:
    """Folders of a store that hold a backbone's embeddings (meta.json or shards)."""
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir()
                  if d.is_dir() and not d.name.startswith(".") and d.name != "statcache"
                  and ((d / META).exists() or any(d.glob(SHARD_GLOB))))


def _size(paths) -> int:
    n = 0
    for p in paths:
        with contextlib.suppress(OSError):
            n += p.stat().st_size
    return n


def _last_used(d: Path, shards: list[Path]) -> float | None:
    with contextlib.suppress(OSError):
        return (d / LAST_USED).stat().st_mtime
    times = []
    for p in shards:
        with contextlib.suppress(OSError):
            times.append(p.stat().st_mtime)
    return max(times) if times else None


def _namespace_info(d: Path) -> NamespaceInfo:
    shards = sorted(d.glob(SHARD_GLOB))
    problem = None
    backbone = dim = None
    try:
        meta = read_namespace_meta(d)
        backbone, dim = meta.get("backbone"), meta["dim"]
    except StoreError as e:
        problem = str(e)
    rows = 0
    for s in shards:
        try:
            rows += pq.ParquetFile(s).metadata.num_rows  # the footer only: cheap
        except (OSError, ValueError, pa.ArrowException):  # `featx cache verify` says why
            problem = problem or f"{s.name}: unreadable footer; run `featx cache verify`"
    files = [p for p in d.rglob("*") if p.is_file()]
    qdir = d / QUARANTINE
    return NamespaceInfo(d.name, d, backbone, dim, len(shards), rows, _size(files),
                         len(list(qdir.glob("*.parquet"))) if qdir.is_dir() else 0,
                         _last_used(d, shards), problem)


def cache_info(store: str | os.PathLike | None = None) -> CacheInfo:
    """Size, rows, shards and last use of every backbone namespace in ``store``.

    Reads only directory entries and Parquet footers, so it is quick on a large store.
    """
    root = _root(store)
    infos = [_namespace_info(d) for d in _namespaces(root)]
    infos.sort(key=lambda n: (-n.bytes, n.fingerprint))
    return CacheInfo(root, infos)


# ---------------------------------------------------------------- prune

@dataclass
class Removed:
    """One thing ``prune_cache`` removed (or would remove, in a dry run)."""

    path: Path
    fingerprint: str
    backbone: str | None
    bytes: int
    why: str

    def to_dict(self) -> dict:
        return {"path": str(self.path), "fingerprint": self.fingerprint, "backbone": self.backbone,
                "bytes": self.bytes, "why": self.why}


@dataclass
class PruneResult:
    """What was removed; with ``dry_run`` nothing was, this is what would be."""

    removed: list[Removed]
    dry_run: bool

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.removed)

    def to_dict(self) -> dict:
        return {"dry_run": self.dry_run, "bytes": self.bytes, "removed": [r.to_dict() for r in self.removed]}


def _matching(infos: list[NamespaceInfo], backbone: str) -> list[NamespaceInfo]:
    """Namespaces of a backbone name, or the one whose fingerprint starts with ``backbone``."""
    by_name = [n for n in infos if n.backbone == backbone]
    if by_name:
        return by_name
    by_fp = [n for n in infos if len(backbone) >= 4 and n.fingerprint.startswith(backbone)]
    if len(by_fp) > 1:
        raise FeatXError(f"fingerprint prefix {backbone!r} matches {len(by_fp)} namespaces "
                         f"({', '.join(n.fingerprint for n in by_fp)}); give more of it")
    if not by_fp:
        known = ", ".join(sorted({f"{n.backbone} ({n.fingerprint})" for n in infos})) or "none"
        raise FeatXError(f"no cached embeddings for backbone {backbone!r} (a name or a fingerprint "
                         f"of at least 4 characters). Cached: {known}. See `featx cache info`.")
    return by_fp


def _remove_tree(path: Path) -> None:
    # rename first, so a concurrent reader sees the whole namespace or none of it
    doomed = path.with_name(f".{path.name}.pruned-{uuid.uuid4().hex[:8]}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def _select(infos: list[NamespaceInfo], older_than: float | None, backbone: str | None,
            now: float) -> list[tuple[NamespaceInfo, str]]:
    chosen = _matching(infos, backbone) if backbone is not None else infos
    out = []
    for n in chosen:
        whys = [f"backbone {backbone}"] if backbone is not None else []
        if older_than is not None:
            if n.last_used is not None and now - n.last_used < older_than:
                continue
            days = "never" if n.last_used is None else f"{(now - n.last_used) / 86400:.1f} days ago"
            whys.append(f"last used {days}")
        out.append((n, ", ".join(whys)))
    return out


def prune_cache(store: str | os.PathLike | None = None, *, older_than: float | None = None,
                backbone: str | None = None, quarantined: bool = False, dry_run: bool = True,
                now: float | None = None) -> PruneResult:
    """Remove namespaces unused for ``older_than`` seconds and/or of ``backbone``, or quarantine.

    Parameters
    ----------
    older_than : seconds since the last use (both filters given: a namespace must match both).
    backbone : a backbone name (all its namespaces) or a fingerprint (a prefix of 4+ characters).
    quarantined : remove the quarantined shards of every namespace (alone or with the above).
    dry_run : report what would be removed and remove nothing (the default).

    Do not prune a backbone while a run is using it: that run's next shard write fails.
    """
    if older_than is None and backbone is None and not quarantined:
        raise FeatXError("say what to prune: older_than, backbone and/or quarantined")
    if older_than is not None and older_than < 0:
        raise FeatXError(f"older_than must be >= 0 seconds, got {older_than}")
    infos = cache_info(store).namespaces
    now = time.time() if now is None else now
    removed: list[Removed] = []
    if older_than is not None or backbone is not None:
        for n, why in _select(infos, older_than, backbone, now):
            removed.append(Removed(n.path, n.fingerprint, n.backbone, n.bytes, why))
    gone = {r.path for r in removed}
    if quarantined:
        for n in infos:
            q = n.path / QUARANTINE
            if n.path not in gone and q.is_dir() and any(q.iterdir()):
                removed.append(Removed(q, n.fingerprint, n.backbone, _size(q.iterdir()),
                                       "quarantined shards"))
    if not dry_run:
        for r in removed:
            _remove_tree(r.path)
            log.info("removed %s (%s, %d bytes)", r.path, r.why, r.bytes)
    return PruneResult(removed, dry_run)


# ---------------------------------------------------------------- verify

@dataclass
class NamespaceReport:
    """The result of checking one namespace's shards."""

    fingerprint: str
    backbone: str | None
    shards_ok: int = 0
    rows_ok: int = 0
    unchecksummed: int = 0  # shards from before checksums: structural checks only
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (shard, reason)
    problem: str | None = None  # meta.json unreadable: the shards could not be checked

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "backbone": self.backbone, "shards_ok": self.shards_ok,
                "rows_ok": self.rows_ok, "unchecksummed": self.unchecksummed,
                "quarantined": [{"shard": s, "reason": r} for s, r in self.quarantined],
                "problem": self.problem}


@dataclass
class VerifyReport:
    """Every namespace checked; ``ok`` is False if anything was damaged or unreadable."""

    root: Path
    namespaces: list[NamespaceReport]
    temporaries_removed: int = 0

    @property
    def ok(self) -> bool:
        return all(not n.quarantined and n.problem is None for n in self.namespaces)

    def to_dict(self) -> dict:
        return {"store": str(self.root), "ok": self.ok, "temporaries_removed": self.temporaries_removed,
                "namespaces": [n.to_dict() for n in self.namespaces]}


def _verify_namespace(d: Path, progress: ProgressFn) -> NamespaceReport:
    try:
        meta = read_namespace_meta(d)
    except StoreError as e:
        return NamespaceReport(d.name, None, problem=str(e))
    rep = NamespaceReport(d.name, meta.get("backbone"))
    shards = sorted(d.glob(SHARD_GLOB))
    for i, s in enumerate(shards):
        try:
            content = read_shard(s, meta["dim"])
        except DamagedShardError as e:
            quarantine(s, e.reason)
            rep.quarantined.append((s.name, e.reason))
        except FileNotFoundError:
            pass  # pruned or quarantined by another process meanwhile
        else:
            rep.shards_ok += 1
            rep.rows_ok += len(content.keys)
            rep.unchecksummed += not content.checksummed
        progress(f"verify {d.name}", i + 1, len(shards))
    return rep


def verify_cache(store: str | os.PathLike | None = None, *, backbone: str | None = None,
                 progress: ProgressFn = no_progress) -> VerifyReport:
    """Read and check every shard of ``store`` (or of one ``backbone``); quarantine damaged ones.

    Reads the whole store once (every embedding), one shard at a time. Stale temporaries of
    killed runs are removed on the way.
    """
    root = _root(store)
    dirs = _namespaces(root)
    if backbone is not None:
        dirs = [n.path for n in _matching([_namespace_info(d) for d in dirs], backbone)]
    removed = clean_temporaries(root) + sum(clean_temporaries(d) for d in dirs)
    return VerifyReport(root, [_verify_namespace(d, progress) for d in dirs], removed)
