"""Embedding store: checksummed Parquet shards, one namespace per backbone fingerprint.

Layout::

    <root>/FORMAT                         {"featx_store_format": 1}
    <root>/statcache/                     stat records of scanned folders (embed.statcache)
    <root>/<fingerprint>/meta.json        backbone name and embedding dim
    <root>/<fingerprint>/LAST_USED        touched whenever a run opens the namespace
    <root>/<fingerprint>/VERIFIED         shards fully checked, with their stat (a cache)
    <root>/<fingerprint>/shard-*.parquet  (key, embedding) rows, keyed by content hash
    <root>/<fingerprint>/quarantine/      shards that failed their checks, with the reason

**Writing.** ``ShardWriter`` buffers rows and publishes a shard every ``shard_size`` rows or
``flush_seconds`` seconds, and on close, error or Ctrl-C; every engine and ``featx.predict``
write through it. A shard is written under a unique temporary name (``featx.atomic``),
fsynced and renamed, so readers never see half a shard, a killed writer loses only rows it
had not flushed, and concurrent writers never collide. A key written twice (two processes)
is deduplicated on read: the first copy wins. Temporaries of killed runs older than a day
are removed when a store is opened.

**Integrity: the cache never lies.** Each shard's Parquet footer holds ``featx.shard``: JSON
with its row count, dim and the sha256 of its keys and of its embeddings (float32,
little-endian, row-major); Parquet page CRCs are written too and verified on every read.
A row's embedding must be ``dim`` float32 values (the column type is
``fixed_size_list<float>[dim]``), and NaN/inf are refused when written. Checks on read:

- ``keys()`` reads the key column and footer of each shard (cheap: the key column only);
- ``stored(keys)`` fully checks the shards that hold those keys (checksums, dim, finite
  values); the engines ask it before deciding what to embed, so a damaged shard's rows are
  recomputed in the same run. A shard that passed that check is recorded in ``VERIFIED``
  with its size, mtime, ctime and inode (like the stat cache), and so is a shard
  ``ShardWriter`` wrote (its checksums come from the bytes it wrote): a later run trusts the
  record while all four match, so a re-run over a big store reads its embeddings once (to
  serve them), not twice. Any write to the file changes its ctime, which no user call can
  set back; damage that changes no stat field (a failing disk) is still caught by the next
  check, below, when the rows are served;
- ``get`` / ``iter_get`` verify again the bytes they return (checksums and page CRCs): a
  shard damaged since its record was written is quarantined there and the run stops asking
  to be run again (which recomputes its rows).

A shard that fails any check (garbage, zero bytes, truncated, wrong schema or dim, flipped
bytes, checksum mismatch, NaN) is moved to ``quarantine/`` with a warning naming it and is
never served; if it cannot be moved (read-only store) it is skipped. ``featx cache verify``
checks a whole store.

A footer's ``version`` above ``SHARD_META_VERSION`` (a newer featx wrote the shard into a
shared store) stops the run with ``NewerShardError`` naming the shard: the shard is not
damaged, so it is not quarantined, and this featx cannot know what its footer means.

**Shards from before checksums** (written by earlier featx, no ``featx.shard`` footer, no
page CRCs) are accepted after the structural checks (schema, dim, no nulls, finite values):
recomputing every cached embedding on upgrade would cost hours on a big store, and these
shards were never verified before either. A flipped bit inside one can still go unnoticed;
``featx cache verify`` counts them as unchecksummed, and ``featx cache prune --backbone``
followed by an extract rewrites them with checksums. The store format number is unchanged
(earlier featx reads the new shards: it ignores the footer metadata and page CRCs).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from featx.atomic import TMP_SUFFIX, atomic_path, clean_stale_temporaries, write_text
from featx.backbones.artifact import Backbone
from featx.embed import arrow
from featx.errors import FeatXError, MismatchError, StoreError
from featx.paths import default_store

__all__ = ["DamagedShardError", "EmbeddingStore", "NonFiniteEmbeddingError", "ShardWriter",
           "embeddings_of", "read_embeddings", "read_namespace_meta", "read_shard"]

log = logging.getLogger(__name__)

STORE_FORMAT = 1
SHARD_GLOB = "shard-*.parquet"
QUARANTINE = "quarantine"
LAST_USED = "LAST_USED"
VERIFIED = "VERIFIED"
META = "meta.json"
SHARD_META_KEY = b"featx.shard"
SHARD_META_VERSION = 1
# temporaries of featx versions before featx.atomic; removed on the same one-day rule
LEGACY_TEMPORARIES = (".tmp-shard-*.parquet", "meta.*.tmp")
STALE_AFTER_S = 86400.0
READ_CACHE_BYTES = 128 * 2**20  # shards iter_get keeps between chunks


class DamagedShardError(StoreError):
    """A shard failed its checks; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class NewerShardError(StoreError):
    """A shard whose footer has a version above ``SHARD_META_VERSION``: written by a newer
    featx into a shared store. Not damage (so never quarantined, which would destroy the
    newer featx's cache) and not readable here (its footer may mean something else): the
    run stops with one line naming the shard."""

    def __init__(self, path: str | os.PathLike, version: object) -> None:
        super().__init__(f"{path}: written by a newer featx (shard version {version}; this featx reads "
                         f"version {SHARD_META_VERSION}); upgrade featx, or give this one its own --store")
        self.path = Path(path)
        self.version = version


class NonFiniteEmbeddingError(StoreError):
    """Embeddings with NaN or inf values: refused, never stored. ``keys`` names the rows."""

    def __init__(self, keys: Sequence[str]) -> None:
        shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        super().__init__(f"refused to store NaN or inf embeddings (keys {shown})")
        self.keys = list(keys)


def _store_error(path: Path, e: OSError) -> StoreError:
    todo = "free space or pass --store DIR"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        why = "the disk is full (or a size limit was hit)"
    elif e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        why, todo = "it is not writable", "pass --store DIR"
    elif e.errno == errno.ENOENT:  # the namespace folder went away under us
        why = ("a folder of the store was removed while this run wrote to it (`featx cache prune` "
               "or another clean-up at the same time?)")
        todo = "run the same command again, and it resumes"
    else:
        why = e.strerror or str(e)
    return StoreError(f"cannot write to the embedding store at {path}: {why}. "
                      f"Nothing stored so far was lost; {todo}.")


# ---------------------------------------------------------------- checksums and shard checks

def _key_digest(col: pa.Array) -> str:
    """sha256 of the keys: each key's UTF-8 length (int64 LE) then all key bytes."""
    if len(col) == 0:
        return hashlib.sha256(b"").hexdigest()
    o, data = arrow.offsets_and_data(col)
    h = hashlib.sha256(np.diff(o).astype("<i8").tobytes())
    h.update(data)
    return h.hexdigest()


def _embedding_digest(emb: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(emb, dtype="<f4").data).hexdigest()


@dataclass
class ShardContent:
    """What one checked shard holds; ``checksummed`` is False for shards from before checksums."""

    keys: list[str]
    embeddings: np.ndarray | None
    checksummed: bool


def _check_schema(schema: pa.Schema, dim: int) -> str | None:
    """Why ``schema`` is not a shard of ``dim``-wide rows, or None."""
    names = schema.names
    if names != ["key", "embedding"]:
        return f"wrong schema: columns {names}, expected ['key', 'embedding']"
    if not pa.types.is_string(schema.field("key").type):
        return f"wrong schema: key column is {schema.field('key').type}, expected string"
    t = schema.field("embedding").type
    if not pa.types.is_fixed_size_list(t) or t.value_type != pa.float32():
        return f"wrong schema: embedding column is {t}, expected fixed_size_list<float>[{dim}]"
    if t.list_size != dim:
        return f"rows are {t.list_size} wide, the backbone's embeddings are {dim}"
    return None


def _footer(path: Path, schema: pa.Schema, rows: int, dim: int) -> dict | str | None:
    """The shard's ``featx.shard`` footer (None: a shard from before checksums), or why it is
    bad; NewerShardError when a newer featx wrote it."""
    raw = (schema.metadata or {}).get(SHARD_META_KEY)
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
        version = meta["version"]
        if type(version) is not int:
            return f"unreadable featx.shard footer (version {version!r})"
        if version > SHARD_META_VERSION:
            raise NewerShardError(path, version)
        ok = (meta["rows"], meta["dim"], meta["sha256_key"], meta["sha256_embedding"])
    except (ValueError, KeyError, TypeError):
        return "unreadable featx.shard footer"
    if ok[:2] != (rows, dim):
        return f"footer says {ok[0]} rows x {ok[1]}, the file holds {rows} rows x {dim}"
    return meta


def _open_checked(path: Path, dim: int) -> tuple[pq.ParquetFile, dict | None]:
    """Open a shard and check its schema and footer; raises DamagedShardError."""
    f = pq.ParquetFile(path, page_checksum_verification=True)
    why = _check_schema(f.schema_arrow, dim)
    if why is None:
        meta = _footer(path, f.schema_arrow, f.metadata.num_rows, dim)
        if not isinstance(meta, str):
            return f, meta
        why = meta
    raise DamagedShardError(path, why)


def _read_checked(path: Path, dim: int, embeddings: bool) -> ShardContent:
    f, meta = _open_checked(path, dim)
    t = f.read(columns=["key", "embedding"] if embeddings else ["key"])
    key = t.column("key").combine_chunks()
    if key.null_count:
        raise DamagedShardError(path, "missing keys (nulls in the key column)")
    if meta is not None and _key_digest(key) != meta["sha256_key"]:
        raise DamagedShardError(path, "checksum mismatch in the key column")
    emb = None
    if embeddings:
        emb = _embeddings(t, dim, path)
        if not np.isfinite(emb).all():
            raise DamagedShardError(path, "NaN or inf values in the embeddings")
        if meta is not None and _embedding_digest(emb) != meta["sha256_embedding"]:
            raise DamagedShardError(path, "checksum mismatch in the embeddings")
    return ShardContent(key.to_pylist(), emb, meta is not None)


def read_shard(path: str | os.PathLike, dim: int, *, embeddings: bool = True) -> ShardContent:
    """Read one shard and check it: schema, dim, footer checksums, page CRCs, finite values.

    Raises
    ------
    DamagedShardError
        The shard is damaged (the reason says how); it must not be served.
    FileNotFoundError
        It vanished (another process quarantined or pruned it).
    StoreError
        It cannot be read for a reason that is not damage (permissions).
    """
    path = Path(path)
    try:
        return _read_checked(path, dim, embeddings)
    except (DamagedShardError, FileNotFoundError):
        raise
    except PermissionError as e:
        raise StoreError(f"cannot read {path}: {e.strerror or e}") from None
    except (pa.ArrowException, OSError, ValueError, EOFError) as e:
        # garbage, zero bytes, truncation, a failed page CRC, corrupt compression, bad thrift
        raise DamagedShardError(path, f"unreadable Parquet ({type(e).__name__}: {e})") from None


def quarantine(path: str | os.PathLike, reason: str) -> Path | None:
    """Move a damaged shard to ``quarantine/`` beside it (with a ``.reason`` note), warning.

    Returns the new path, or None if it could not be moved (it vanished, or the store is
    read-only: then the caller must skip it).
    """
    path = Path(path)
    qdir = path.parent / QUARANTINE
    dest = qdir / path.name
    try:
        qdir.mkdir(exist_ok=True)
        if dest.exists():
            dest = qdir / f"{path.stem}.{uuid.uuid4().hex[:8]}{path.suffix}"
        os.replace(path, dest)
    except FileNotFoundError:
        return None  # another process moved it first
    except OSError as e:
        log.warning("embedding store shard %s is damaged (%s) and cannot be moved aside (%s); "
                    "it is skipped and its rows are recomputed", path, reason, e.strerror or e)
        return None
    with contextlib.suppress(OSError):
        write_text(dest.with_name(dest.name + ".reason"), reason + "\n")
    log.warning("embedding store shard %s is damaged (%s); moved it to %s, its rows are recomputed",
                path, reason, dest)
    return dest


def _read_json(path: Path, what: str) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable {what} ({type(e).__name__}: {e}). It was damaged or "
                         "edited; delete it (featx writes it again) or point --store at another "
                         "directory.") from None
    if not isinstance(doc, dict):
        raise StoreError(f"{path}: not a featx {what} (a JSON object was expected, found "
                         f"{type(doc).__name__}). Delete it or point --store at another directory.")
    return doc


def read_namespace_meta(directory: str | os.PathLike) -> dict:
    """A namespace's ``meta.json`` (``fingerprint``, ``dim``, ``backbone``); StoreError if damaged."""
    path = Path(directory) / META
    meta = _read_json(path, "store meta.json")
    if not isinstance(meta.get("dim"), int) or isinstance(meta.get("dim"), bool):
        raise StoreError(f"{path}: store meta.json has no integer dim ({meta.get('dim')!r}). "
                         "Delete it (featx writes it again) or point --store at another directory.")
    return meta


#: a shard temporary ``.shard-<ns>-<pid>-<hex>.parquet.<random>.featx-tmp`` (see ``_publish``)
_SHARD_TMP = re.compile(r"^\.shard-\d+-(\d+)-[0-9a-f]+\.parquet\..*" + re.escape(TMP_SUFFIX) + "$")
#: a shard temporary of a writer that is gone is removed once untouched this long: a live
#: writer touches it every moment, and a writer on another machine (a shared store) has a
#: pid that means nothing here, so its age is what tells
DEAD_WRITER_GRACE_S = 60.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _dead_writers_temporaries(folder: Path, now: float) -> int:
    """Remove shard temporaries whose writer process is gone (the pid is in the name)."""
    n = 0
    with contextlib.suppress(OSError):
        for p in folder.glob(f".shard-*{TMP_SUFFIX}"):
            m = _SHARD_TMP.match(p.name)
            if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
                continue
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > DEAD_WRITER_GRACE_S:
                    p.unlink()
                    n += 1
    return n


def clean_temporaries(folder: Path) -> int:
    """Remove temporaries of killed writers in ``folder``; returns how many.

    Any temporary older than a day; a shard temporary as soon as its writer process is
    gone and it has been untouched for ``DEAD_WRITER_GRACE_S``.
    """
    n = _dead_writers_temporaries(folder, time.time())
    return n + clean_stale_temporaries(folder, STALE_AFTER_S, (f".*{TMP_SUFFIX}", *LEGACY_TEMPORARIES))


# ---------------------------------------------------------------- the store

class EmbeddingStore:
    """The cached embeddings of one backbone.

    Parameters
    ----------
    backbone : the backbone whose fingerprint names the namespace and whose dim every row has.
    root : the store directory (default ``$FEATX_HOME/store``).
    """

    def __init__(self, backbone: Backbone, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_store()
        self.fingerprint = backbone.fingerprint
        self.dim = backbone.dim
        self.dir = self.root / self.fingerprint
        self._shard_keys: dict[str, list[str]] = {}  # shards are immutable: keys read once
        self._checked: dict[str, tuple[int, ...]] = {}  # fully checked shard -> its stat
        self._recorded: dict[str, tuple[int, ...]] | None = None  # VERIFIED, read on first use
        self._unrecorded: list[str] = []  # checked or written here, not yet in VERIFIED
        self._skip: set[str] = set()  # damaged shards that could not be moved aside
        self._check_format(backbone)
        self._housekeeping()

    def _check_format(self, backbone: Backbone) -> None:
        fmt_file = self.root / "FORMAT"
        meta_file = self.dir / META
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.root / ".lock")):
                if not fmt_file.exists():
                    write_text(fmt_file, json.dumps({"featx_store_format": STORE_FORMAT}))
                if not meta_file.exists():
                    write_text(meta_file, json.dumps({"fingerprint": self.fingerprint, "dim": self.dim,
                                                      "backbone": backbone.name}))
        except OSError as e:
            if not fmt_file.exists():
                raise _store_error(self.root, e) from None
        fmt = _read_json(fmt_file, "store FORMAT file").get("featx_store_format")
        if fmt != STORE_FORMAT:
            raise StoreError(
                f"{fmt_file}: this store was written by store format {fmt!r}; this featx reads "
                f"format {STORE_FORMAT}. Point --store at a new directory (embeddings are recomputed)."
            )
        if meta_file.exists():
            dim = read_namespace_meta(self.dir)["dim"]
            if dim != self.dim:
                raise MismatchError(f"{self.dir}: stored embeddings have dim {dim}, backbone gives {self.dim}")

    def _housekeeping(self) -> None:
        """Remove stale temporaries of killed runs; record this use (for ``featx cache info``)."""
        for folder in (self.root, self.dir):
            n = clean_temporaries(folder)
            if n:
                log.info("removed %d stale temporary file(s) of killed runs in %s", n, folder)
        marker = self.dir / LAST_USED
        with contextlib.suppress(OSError):  # a read-only store is still readable
            if marker.exists():
                os.utime(marker)
            else:
                write_text(marker, "")

    # ------------------------------------------------------------ reading

    def shards(self) -> list[Path]:
        """The shard files of this namespace (not the quarantined ones), oldest first."""
        return sorted(p for p in self.dir.glob(SHARD_GLOB) if p.name not in self._skip)

    def _reject(self, shard: Path, reason: str) -> None:
        self._shard_keys.pop(shard.name, None)
        self._checked.pop(shard.name, None)
        if self._recorded is not None and self._recorded.pop(shard.name, None) is not None:
            self._save_verified([])
        if quarantine(shard, reason) is None and shard.exists():
            self._skip.add(shard.name)

    def _keys_of(self, shard: Path) -> list[str]:
        """The keys of a shard, after the cheap checks; [] if it is damaged (then quarantined)."""
        if shard.name not in self._shard_keys:
            try:
                self._shard_keys[shard.name] = read_shard(shard, self.dim, embeddings=False).keys
            except DamagedShardError as e:
                self._reject(shard, e.reason)
                return []
            except FileNotFoundError:
                return []
        return self._shard_keys[shard.name]

    @staticmethod
    def _signature(shard: Path) -> tuple[int, ...] | None:
        try:
            s = shard.stat()
        except FileNotFoundError:
            return None
        return s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino

    def _verified_record(self) -> dict[str, tuple[int, ...]]:
        """``VERIFIED``: shard name -> the stat it had when fully checked (unreadable: empty)."""
        if self._recorded is None:
            self._recorded = {}
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                doc = json.loads((self.dir / VERIFIED).read_text())
                self._recorded = {str(k): tuple(int(x) for x in v) for k, v in doc["shards"].items()}
        return self._recorded

    def _save_verified(self, names: list[str]) -> None:
        """Add newly checked shards to ``VERIFIED`` (atomic; a concurrent writer's additions
        may be lost, which only costs a re-check)."""
        rec = self._verified_record()
        for n in names:
            rec[n] = self._checked[n]
        present = {p.name for p in self.dir.glob(SHARD_GLOB)}
        doc = {"shards": {k: list(v) for k, v in rec.items() if k in present}}
        with contextlib.suppress(OSError):  # a read-only store: checked again next run
            write_text(self.dir / VERIFIED, json.dumps(doc, separators=(",", ":")))

    def _fully_checked(self, shard: Path, new: list[str] | None = None) -> bool:
        """Whether a shard passes every check: read once per file state (this process's memo,
        then ``VERIFIED``); a shard read here is appended to ``new``."""
        sig = self._signature(shard)
        if sig is None:
            return False
        if self._checked.get(shard.name) == sig or self._verified_record().get(shard.name) == sig:
            self._checked[shard.name] = sig
            return True
        try:
            read_shard(shard, self.dim)
        except DamagedShardError as e:
            self._reject(shard, e.reason)
            return False
        except FileNotFoundError:
            return False
        self._checked[shard.name] = sig
        if new is not None:
            new.append(shard.name)
        return True

    def _locate(self, want: set[str]) -> dict[str, tuple[Path, int]]:
        loc: dict[str, tuple[Path, int]] = {}
        for s in self.shards():
            for r, k in enumerate(self._keys_of(s)):
                if k in want and k not in loc:  # first copy wins; concurrent writers may duplicate
                    loc[k] = (s, r)
        return loc

    def keys(self) -> set[str]:
        """Every key stored for this backbone (key columns and footers checked)."""
        out: set[str] = set()
        for s in self.shards():
            out.update(self._keys_of(s))
        return out

    def stored(self, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` have an intact embedding here: what a run need not compute.

        Fully checks (checksums, dim, finite values) every shard that holds one of them;
        a damaged shard is quarantined and its keys are looked for elsewhere, so they are
        either found intact in another shard or reported missing (to be recomputed).
        """
        want = set(keys)
        try:
            while True:
                loc = self._locate(want)
                shards = {s for s, _ in loc.values()}
                if all([self._fully_checked(s, self._unrecorded) for s in sorted(shards)]):
                    return set(loc)
        finally:
            self.record_verified()

    def get(self, keys: list[str]) -> np.ndarray:
        """Embeddings for ``keys`` in that order; KeyError names a missing key."""
        if not keys:
            return np.zeros((0, self.dim), np.float32)
        return next(self.iter_get(keys, len(keys)))

    def iter_get(self, keys: list[str], chunk: int = 4096) -> Iterator[np.ndarray]:
        """Embeddings for ``keys`` in order, ``chunk`` rows at a time, each shard verified on read.

        Memory: one chunk plus the shards it draws from, not the whole table; the shards
        read last are kept (up to ``READ_CACHE_BYTES``) so a shard that spans two chunks is
        read and verified once. A shard damaged since ``stored`` checked it is quarantined
        and DamagedShardError raised.
        """
        loc = self._locate(set(keys))
        missing = set(keys) - loc.keys()
        if missing:
            raise KeyError(next(iter(missing)))
        recent: OrderedDict[Path, np.ndarray] = OrderedDict()

        def embeddings(s: Path) -> np.ndarray:
            if s in recent:
                recent.move_to_end(s)
                return recent[s]
            emb = recent[s] = self._verified_embeddings(s)
            while len(recent) > 1 and sum(e.nbytes for e in recent.values()) > READ_CACHE_BYTES:
                recent.popitem(last=False)
            return emb

        for start in range(0, len(keys), chunk):
            part = keys[start:start + chunk]
            out = np.empty((len(part), self.dim), np.float32)
            by_shard: dict[Path, tuple[list[int], list[int]]] = {}
            for i, k in enumerate(part):
                s, r = loc[k]
                rows, dest = by_shard.setdefault(s, ([], []))
                rows.append(r)
                dest.append(i)
            for s, (rows, dest) in by_shard.items():
                out[dest] = embeddings(s)[rows]
            yield out

    def _verified_embeddings(self, shard: Path) -> np.ndarray:
        try:
            content = read_shard(shard, self.dim)
        except DamagedShardError as e:
            self._reject(shard, e.reason)
            raise DamagedShardError(shard, f"{e.reason}; it was moved to {QUARANTINE}/. Run the "
                                           "command again to recompute its rows.") from None
        except FileNotFoundError:
            raise StoreError(f"{shard} vanished during the run (another featx process quarantined "
                             "or pruned it); run the command again.") from None
        if content.keys != self._shard_keys.get(shard.name, content.keys):
            self._reject(shard, "its keys changed while it was being read")
            raise DamagedShardError(shard, "its keys changed while it was being read; run again")
        return content.embeddings  # type: ignore[return-value]

    # ------------------------------------------------------------ writing

    def write(self, keys: Sequence[str], embeddings: np.ndarray) -> Path | None:
        """Publish one checksummed shard atomically (unique temporary name, fsync, rename).

        Raises MismatchError for rows that are not ``dim`` wide and NonFiniteEmbeddingError
        for NaN/inf rows (use ``ShardWriter``, which sets those rows aside instead).
        """
        if not len(keys):
            return None
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.shape != (len(keys), self.dim):
            raise MismatchError(f"embeddings {emb.shape} do not match {len(keys)} keys x dim {self.dim}")
        bad = ~np.isfinite(emb).all(axis=1)
        if bad.any():
            raise NonFiniteEmbeddingError([k for k, b in zip(keys, bad, strict=True) if b])
        key_col = arrow.strings(keys)
        footer = {"version": SHARD_META_VERSION, "rows": len(keys), "dim": self.dim,
                  "sha256_key": _key_digest(key_col), "sha256_embedding": _embedding_digest(emb)}
        table = arrow.table({"key": key_col, "embedding": arrow.embeddings(emb)},
                            {SHARD_META_KEY: json.dumps(footer).encode()})
        name = f"shard-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        final = self.dir / name
        try:
            with atomic_path(final) as tmp:
                # no dictionary: unique keys and float embeddings gain nothing from one, and
                # trying cost 4x the write time (and a larger file)
                pq.write_table(table, tmp, write_page_checksum=True, use_dictionary=False)
        except OSError as e:
            raise _store_error(self.dir, e) from None
        self._shard_keys[name] = list(keys)
        # checksummed from these very bytes: record it, so the next run need not read it to trust it
        sig = self._signature(final)
        if sig is not None:
            self._checked[name] = sig
            self._unrecorded.append(name)
        return final

    def record_verified(self) -> None:
        """Add the shards written or fully checked since the last call to ``VERIFIED``."""
        if self._unrecorded:
            names, self._unrecorded = self._unrecorded, []
            self._save_verified(names)


class ShardWriter:
    """Buffers (key, embedding) rows and publishes them to a store as shards.

    A shard is written as soon as ``shard_size`` rows are buffered (so shards hold exactly
    ``shard_size`` rows, but the last), when ``flush_seconds`` have passed since the last
    one, and on ``close``. Used as a context manager it also flushes when the block ends
    by an error or Ctrl-C, so a stopped run keeps everything it embedded.

    Rows with NaN or inf values are never buffered: ``add`` returns their positions so the
    caller can report the file each came from.

    Parameters
    ----------
    store : the store to publish to; rows must be ``store.dim`` wide.
    shard_size : rows per shard (the CLI's ``--shard-size``): a killed run loses at most one
        shard (or ``flush_seconds``) of work, and few large shards keep lookups fast.
    flush_seconds : longest time rows wait in the buffer while more arrive.
    """

    def __init__(self, store: EmbeddingStore, shard_size: int = 2048, flush_seconds: float = 10.0) -> None:
        if shard_size < 1:
            raise FeatXError(f"shard_size must be >= 1, got {shard_size}")
        self.store = store
        self.shard_size = shard_size
        self.flush_seconds = flush_seconds
        self.rows_written = 0
        self.shards_written = 0
        self._keys: list[str] = []
        self._emb: list[np.ndarray] = []
        self._last = time.monotonic()
        self._broken = False

    def add(self, keys: Sequence[str], embeddings: np.ndarray) -> list[int]:
        """Buffer rows (flushing full shards); returns the positions of rows refused as NaN/inf."""
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.shape != (len(keys), self.store.dim):
            raise MismatchError(f"embeddings {emb.shape} do not match {len(keys)} keys x dim "
                                f"{self.store.dim}")
        finite = np.isfinite(emb).all(axis=1)
        refused = np.flatnonzero(~finite).tolist()
        if refused:
            log.warning("refused %d NaN/inf embedding(s); they are not stored", len(refused))
            keys = [k for k, ok in zip(keys, finite, strict=True) if ok]
            emb = emb[finite]
        if len(keys):
            self._keys.extend(keys)
            self._emb.append(emb)
        while len(self._keys) >= self.shard_size:
            self._write(self.shard_size)
        if self._keys and time.monotonic() - self._last >= self.flush_seconds:
            self.flush()
        return refused

    def flush(self) -> None:
        """Publish whatever is buffered as one shard."""
        if self._keys:
            self._write(len(self._keys))

    def _write(self, n: int) -> None:
        emb = self._emb[0] if len(self._emb) == 1 else np.concatenate(self._emb)
        try:
            self.store.write(self._keys[:n], emb[:n])
        except StoreError:
            self._broken = True  # a full disk stays full: close() does not try again
            raise
        self._keys = self._keys[n:]
        self._emb = [emb[n:]] if n < len(emb) else []
        self._last = time.monotonic()
        self.rows_written += n
        self.shards_written += 1

    def close(self) -> None:
        """Flush the rest (unless a write already failed); record the shards written as verified."""
        if not self._broken:
            self.flush()
        self.store.record_verified()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _embeddings(table: pa.Table, dim: int, where: str | os.PathLike = "table") -> np.ndarray:
    col = table.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(col.type) or col.type.list_size != dim:
        raise DamagedShardError(where, f"embedding column is {col.type}, expected {dim} floats per row")
    flat = col.flatten()
    if col.null_count or flat.null_count or len(flat) != len(col) * dim:
        raise DamagedShardError(where, "missing values (nulls) in the embeddings")
    if not (pa.types.is_floating(flat.type) or pa.types.is_integer(flat.type)):
        raise DamagedShardError(where, f"embedding values are {flat.type}, expected numbers")
    return arrow.float32_values(flat).reshape(-1, dim)


def embeddings_of(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column of a featx table as float32 (N, dim)."""
    col = table.column("embedding")
    dim = getattr(col.type, "list_size", -1)
    return _embeddings(table, dim, "featx table")


def read_embeddings(f: pq.ParquetFile, where: str | os.PathLike) -> np.ndarray:
    """The ``embedding`` column of a featx table file as float32 (N, dim), one row group at a time.

    Each group is decoded and copied into one preallocated matrix: reading a 50,000 x 4,880
    table (976 MB) raised the peak memory by 1.24x its matrix and took 4.3 CPU s, where the
    whole Arrow table and its combined copy took 3.4x and 7.7 s.
    """
    dim = getattr(f.schema_arrow.field("embedding").type, "list_size", -1)
    out = np.empty((f.metadata.num_rows, max(dim, 0)), np.float32)
    start = 0
    for g in range(f.num_row_groups):
        emb = _embeddings(f.read_row_group(g, columns=["embedding"]), dim, where)
        out[start:start + len(emb)] = emb
        start += len(emb)
    if start != len(out):
        raise DamagedShardError(where, f"{start} embeddings in the row groups, {len(out)} rows in the footer")
    return out
