"""Head files: a fitted head as data (arrays + JSON), the class names and the backbone it belongs to.

Layout (one file, ``*.featx``: a featx head; ``head.featx`` in a run directory; it holds no
pickle. Heads of earlier featx were named ``*.joblib``, and are read by any name)::

    FEATX-HEAD\\n                 magic line
    <header length>\\n            decimal byte count of the JSON header
    <JSON header>                 format 2, classes, backbone fingerprint, preprocessing,
                                  training summary, versions, the model description
                                  (estimator kinds + scalars), sha256 checksums
    <payload>                     an uncompressed .npz of numeric arrays (coefficients,
                                  scaler statistics, support vectors, calibration; the
                                  novelty sample and conformal scores, whose descriptions
                                  are the header's "novelty" and "conformal" keys)

Loading reads JSON and numeric arrays only (``numpy.load(allow_pickle=False)``) and
rebuilds scikit-learn estimators of a fixed list of kinds (``featx.heads.codec``), so a
head file cannot run code: a forged or damaged one can at worst predict wrongly. No key
is involved, so a head written on one machine loads on any other. The checksums
(``payload_sha256`` over the arrays, ``content_sha256`` over header and arrays) catch
damage and accidental edits; they are not a signature.

Heads written by featx before this format (format 1: an HMAC-signed pickle) are still
read, with that format's check: the HMAC must verify with ``FEATX_HEAD_KEY`` or with this
user's key file (see ``legacy_key``), else the user opts in (``trust=True`` or
``FEATX_TRUST_HEADS=1``, ``true`` or ``yes``; any other value but ``0``, ``false``,
``no`` or empty is an error). Once read, such a head is rewritten in place in the data
format, so its pickle is read once.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import platform
import stat
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx import __version__
from featx.atomic import write_bytes
from featx.backbones.artifact import Backbone
from featx.backbones.cards import Preprocess
from featx.backbones.resolve import check_fingerprint, recorded_backbone
from featx.errors import FeatXError
from featx.heads.codec import CodecError, decode, encode
from featx.heads.conformal import Conformal
from featx.heads.novelty import Novelty

log = logging.getLogger(__name__)

MAGIC = b"FEATX-HEAD\n"
FORMAT = 2
LEGACY_FORMAT = 1
HEAD_FILE = "head.featx"
#: the name earlier featx gave a run directory's head (a legacy pickle, or a data head then)
LEGACY_HEAD_FILE = "head.joblib"
KEY_ENV = "FEATX_HEAD_KEY"
TRUST_ENV = "FEATX_TRUST_HEADS"
MAX_HEADER = 16 * 1024 * 1024
MAX_ARRAYS = 256
TRAIN_KEYS = "train.keys"  # payload array: digests of the training rows' content keys
PROBA_BLOCK = 8192  # rows scored at a time by Head.proba


class HeadFileError(FeatXError):
    """A head file that is not featx's, is damaged, or fails its integrity check."""


class HeadKeyError(HeadFileError):
    """The key that checks legacy (pickle) heads is missing or unsafe to trust."""


@dataclass
class Head:
    """A loaded head: ``pipeline.predict_proba`` column ``j`` is class ``classes[j]``."""

    pipeline: object
    classes: list[str]
    fingerprint: str
    backbone_dir: str
    preprocess: Preprocess
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    train_keys: np.ndarray | None = None  # sorted uint64 digests (train_key_digests); None: not recorded
    novelty: Novelty | None = None  # flags embeddings unlike the training rows (heads.novelty)
    conformal: Conformal | None = None  # conformal prediction sets (heads.conformal)

    @property
    def backbone_name(self) -> str:
        return self.meta.get("backbone", {}).get("name", "")

    def class_columns(self) -> list[str]:
        """Class name of each ``predict_proba`` column (heads are trained on codes 0..K-1,
        but a pipeline built elsewhere may carry the names themselves)."""
        cls = getattr(self.pipeline, "classes_", None)
        if cls is None:
            return list(self.classes)
        out = []
        for c in np.asarray(cls).tolist():
            if isinstance(c, (int, np.integer)) and 0 <= int(c) < len(self.classes):
                out.append(self.classes[int(c)])
            else:
                out.append(str(c))
        return out

    def proba(self, X: np.ndarray) -> np.ndarray:
        """Probabilities (N, K) of embeddings ``X``, columns in ``class_columns()`` order."""
        from threadpoolctl import threadpool_limits

        if X.shape[1:] != (self.meta.get("backbone", {}).get("dim", X.shape[1]),):
            raise FeatXError(f"embeddings have dim {X.shape[1]}, the head expects "
                             f"{self.meta['backbone']['dim']}")
        if len(X) == 0:
            return np.zeros((0, len(self.class_columns())))
        with threadpool_limits(limits=1):  # one BLAS thread: small matrices, many callers
            return proba_in_blocks(self.pipeline, X)

    def check_backbone(self, bb: Backbone) -> None:
        """Refuse a backbone other than the one the head was trained on."""
        check_fingerprint(bb, self.fingerprint, *self._mismatch())

    def _mismatch(self) -> tuple[str, str]:
        return (f"head {self.path or ''} was trained on backbone {self.backbone_name!r}",
                "use the head's own backbone (omit --backbone) or fit a new head on embeddings "
                "from this backbone.")


def proba_in_blocks(pipeline, X: np.ndarray) -> np.ndarray:
    """``pipeline.predict_proba(X)`` as float64, ``PROBA_BLOCK`` rows at a time.

    The scaler's copy and the float64 product of a 50,000 x 4,880 pool would otherwise be
    whole-matrix temporaries (measured: 5x the CPU time, 2 GB more memory); rows are scored
    independently, so the result is the same.
    """
    if len(X) == 0:
        return np.zeros((0, len(pipeline.classes_)))
    parts = [pipeline.predict_proba(X[i:i + PROBA_BLOCK]) for i in range(0, len(X), PROBA_BLOCK)]
    return np.concatenate(parts).astype(np.float64, copy=False)


def head_path(path: str | os.PathLike) -> Path:
    """A head file (any name: ``*.featx``, or ``*.joblib`` written by earlier featx), or a
    (run) directory holding ``head.featx`` (else ``head.joblib``)."""
    p = Path(path)
    if p.is_dir():
        legacy = p / LEGACY_HEAD_FILE
        p = legacy if legacy.is_file() and not (p / HEAD_FILE).is_file() else p / HEAD_FILE
    if not p.is_file():
        raise HeadFileError(f"{path}: no such head file (expected a head file written by `featx fit-head` "
                            f"(*.featx, or *.joblib from earlier featx), or a run directory containing "
                            f"{HEAD_FILE})")
    return p


# ---- writing -----------------------------------------------------------------------------------

def json_default(o):
    """``json.dumps(default=...)``: numpy values, paths and sets as plain JSON."""
    if hasattr(o, "tolist"):  # numpy scalars and arrays
        return o.tolist()
    if isinstance(o, (Path, os.PathLike)):
        return os.fspath(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)  # stored, not deflated: sizes are what they say
    return buf.getvalue()


def _content_sha(header_wo_sha: dict, payload: bytes) -> str:
    h = hashlib.sha256(json.dumps(header_wo_sha, sort_keys=True).encode())
    h.update(payload)
    return h.hexdigest()


def key_digests(keys) -> np.ndarray:
    """One 64-bit digest per content key, in order (uint64)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(),
                                       "little") for k in keys), dtype=np.uint64)


def train_key_digests(keys) -> np.ndarray:
    """The training rows' content keys as a sorted set of 64-bit digests (8 bytes a row).

    A head records these instead of the keys themselves (16+ bytes of text each), so
    ``featx evaluate`` can tell which test images were training images. Two different
    images share a digest with odds of about n^2 / 2^65: none at any size featx handles.
    """
    return np.unique(key_digests(keys))


def head_bytes(pipeline, classes: list[str], backbone: Backbone, train_summary: dict,
               where: Path | None = None, novelty: Novelty | None = None,
               conformal: Conformal | None = None, *, train_keys=None) -> bytes:
    """The bytes of a head file (see the module docstring); ``where`` is the folder it goes to;
    ``train_keys`` are the training rows' content keys, recorded as ``train_key_digests``."""
    import sklearn

    if not hasattr(pipeline, "predict_proba"):
        raise FeatXError(f"the head pipeline {type(pipeline).__name__} has no predict_proba")
    try:
        spec, arrays = encode(pipeline)
    except CodecError as e:
        raise FeatXError(str(e)) from None
    if train_keys is not None:
        arrays[TRAIN_KEYS] = train_key_digests(train_keys)
    extra: dict = {}
    for key, part in (("novelty", novelty), ("conformal", conformal)):
        if part is not None:
            extra[key], more = part.to_record()
            arrays.update(more)
    payload = _npz(arrays)
    bdir = Path(backbone.onnx_path).parent.resolve()
    try:  # a head saved inside a run directory finds its backbone even if the run moves
        rel = os.path.relpath(bdir, where.resolve()) if where is not None else None
    except ValueError:  # different drives on Windows
        rel = None
    header = {
        "format": FORMAT,
        "classes": [str(c) for c in classes],
        "backbone": {"name": backbone.name, "fingerprint": backbone.fingerprint, "dim": backbone.dim,
                     "dir": str(bdir), "dir_relative": rel, "card": backbone.meta.get("card")},
        "preprocess": backbone.preprocess.to_dict(),
        "model": spec,
        "train": train_summary,
        "versions": {"featx": __version__, "sklearn": sklearn.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "payload_bytes": len(payload),
        **extra,
    }
    # numpy scalars/arrays in a caller's summary become plain JSON; the checksum is then
    # taken over exactly what load_head parses back
    header = json.loads(json.dumps(header, default=json_default))
    header["content_sha256"] = _content_sha(header, payload)
    hb = json.dumps(header).encode()
    return MAGIC + f"{len(hb)}\n".encode() + hb + payload


def save_head(path: str | os.PathLike, pipeline, classes: list[str], backbone: Backbone,
              train_summary: dict, novelty: Novelty | None = None,
              conformal: Conformal | None = None, *, train_keys=None) -> Path:
    """Write a head file (atomically); a directory gets ``head.featx`` inside it.

    The pipeline must be one featx builds (see ``featx.heads.codec.KINDS``); it is
    stored as arrays, never pickled. ``train_keys`` (the content keys of the training
    rows) are recorded as digests, for ``featx evaluate``'s overlap check. ``novelty`` and
    ``conformal`` (what ``featx.heads.fit.fit_head_full`` returns beside the pipeline) are
    stored as arrays too.
    """
    p = Path(path)
    if p.is_dir():
        p = p / HEAD_FILE
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        return write_bytes(p, head_bytes(pipeline, classes, backbone, train_summary, p.parent,
                                          novelty, conformal, train_keys=train_keys))
    except OSError as e:
        raise FeatXError(f"cannot write the head file {p}: {e.strerror or e}") from None


# ---- reading -----------------------------------------------------------------------------------

def _split(p: Path) -> tuple[dict, bytes]:
    try:
        data = p.read_bytes()
    except OSError as e:
        raise HeadFileError(f"{p}: cannot read the head file ({e.strerror or e})") from None
    if not data.startswith(MAGIC):
        raise HeadFileError(
            f"{p}: not a featx head file (no FEATX-HEAD marker). featx only loads heads written "
            "by `featx fit-head` / featx.heads.headfile.save_head; it will not unpickle other files.")
    rest = data[len(MAGIC):]
    nl = rest.find(b"\n", 0, 20)
    try:
        if nl < 1:
            raise ValueError("no header length")
        n = int(rest[:nl])
        if not 0 < n <= MAX_HEADER or len(rest) < nl + 1 + n:
            raise ValueError(n)
        header = json.loads(rest[nl + 1:nl + 1 + n])
        if not isinstance(header, dict):
            raise ValueError(header)
    except (ValueError, RecursionError):
        raise HeadFileError(f"{p}: damaged featx head file (unreadable header); "
                            "fit the head again with `featx fit-head`") from None
    return header, rest[nl + 1 + n:]


def peek_header(path: str | os.PathLike) -> dict | None:
    """The JSON header of a featx head file, unverified; None when the file is not one."""
    try:
        return _split(Path(path))[0]
    except HeadFileError:
        return None


def read_header(path: str | os.PathLike, trust: bool = False) -> tuple[dict, bytes, Path]:
    """Parse and verify a head file without building or unpickling anything.

    Returns (header, payload, path). For a data head (format 2) the checksums are
    verified. For a legacy pickle head (format 1) the sha256 and the HMAC are, unless
    ``trust`` (or FEATX_TRUST_HEADS=1) accepts one signed elsewhere or not signed.
    """
    p = head_path(path)
    header, payload = _split(p)
    fmt = header.get("format")
    if fmt not in (FORMAT, LEGACY_FORMAT):
        raise HeadFileError(f"{p}: head file format {fmt!r}; this featx reads formats "
                            f"{LEGACY_FORMAT} and {FORMAT}. Fit the head again with this featx.")
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise HeadFileError(
            f"{p}: integrity check failed (the payload's sha256 does not match its header); the "
            "file was modified or truncated. Refusing to load it; fit the head again.")
    if fmt == FORMAT:
        rest = {k: v for k, v in header.items() if k != "content_sha256"}
        if header.get("content_sha256") != _content_sha(rest, payload):
            raise HeadFileError(f"{p}: integrity check failed (the header was modified after "
                                "writing); refusing to load it; fit the head again.")
    else:
        _check_legacy_signature(p, header, payload, trust)
    for k in ("classes", "backbone", "preprocess"):
        if k not in header:
            raise HeadFileError(f"{p}: damaged featx head file (header has no {k!r})")
    if not isinstance(header["backbone"], dict) or not isinstance(header["classes"], list):
        raise HeadFileError(f"{p}: damaged featx head file (malformed backbone or classes)")
    return header, payload, p


def _arrays(p: Path, payload: bytes) -> dict[str, np.ndarray]:
    """The payload's arrays; numeric only, stored uncompressed, nothing unpickled."""
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as z:
            infos = z.infolist()
            if len(infos) > MAX_ARRAYS or any(i.compress_type != zipfile.ZIP_STORED for i in infos):
                raise ValueError("unexpected archive layout")
            for info in infos:
                _check_declared_size(z, info)
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise HeadFileError(f"{p}: damaged featx head file (its arrays cannot be read: {e})") from None


def _check_declared_size(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Refuse an array whose header declares more data than its member holds, before numpy
    allocates it (a forged shape of 2**40 would otherwise end in MemoryError)."""
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"array {info.filename!r}: .npy format {version}")
        shape, _, dtype = readers[version](f)
        declared = dtype.itemsize * int(np.prod(shape, dtype=object))
        if dtype.hasobject or declared > info.file_size:
            raise ValueError(f"array {info.filename!r} declares shape {shape} of {dtype} "
                             f"({declared} bytes) but holds {info.file_size} bytes")


def _build(p: Path, header: dict, arrays: dict[str, np.ndarray]):
    dim = header["backbone"].get("dim")
    if not isinstance(dim, int) or not 0 < dim <= 1 << 20:
        raise HeadFileError(f"{p}: damaged featx head file (embedding dim {dim!r})")
    try:
        pipeline = decode(header.get("model"), arrays, dim)
        check = np.asarray(pipeline.predict_proba(np.zeros((2, dim))))
    except CodecError as e:
        raise HeadFileError(f"{p}: damaged featx head file ({e})") from None
    except (ValueError, TypeError, IndexError, AttributeError) as e:
        raise HeadFileError(f"{p}: the stored head does not work ({type(e).__name__}: {e})") from None
    if check.shape != (2, len(header["classes"])) or not np.isfinite(check).all():
        raise HeadFileError(f"{p}: the stored head gives {check.shape[-1]} probabilities for "
                            f"{len(header['classes'])} classes; the file is damaged")
    return pipeline


def load_head(path: str | os.PathLike, trust: bool = False) -> Head:
    """Load a head file (or a directory containing ``head.featx``, or an earlier ``head.joblib``).

    A data head (format 2) loads anywhere, no key needed. A legacy pickle head is
    checked as before (``trust`` as in ``read_header``), unpickled once and rewritten
    in place in the data format.
    """
    header, payload, p = read_header(path, trust=trust)
    keys, novelty, conformal = None, None, None
    if header["format"] == FORMAT:
        arrays = _arrays(p, payload)  # read once: the model, training keys and extras share them
        pipeline = _build(p, header, arrays)
        keys = _train_keys(p, arrays)
        novelty, conformal = _extras(p, header, arrays)
    else:
        pipeline = _load_legacy(p, header, payload)
    bb = header["backbone"]
    bdir = bb.get("dir", "")
    rel = bb.get("dir_relative")
    if isinstance(rel, str) and (p.parent / rel / "model.json").is_file():
        bdir = str((p.parent / rel).resolve())
    try:
        pre = Preprocess.from_dict(header["preprocess"], stored=True)
    except Exception as e:  # a damaged spec: whatever Preprocess raises on it
        raise HeadFileError(f"{p}: damaged featx head file (preprocessing: {e})") from None
    return Head(pipeline=pipeline, classes=[str(c) for c in header["classes"]],
                fingerprint=str(bb.get("fingerprint", "")), backbone_dir=str(bdir or ""),
                preprocess=pre, meta=header, path=p, train_keys=keys, novelty=novelty,
                conformal=conformal)


def _train_keys(p: Path, arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """The recorded training-key digests, or None (a head written before featx recorded them)."""
    a = arrays.get(TRAIN_KEYS)
    if a is None:
        return None
    if a.dtype != np.uint64 or a.ndim != 1:
        raise HeadFileError(f"{p}: damaged featx head file (training keys {a.dtype} {a.shape})")
    return a


def _extras(p: Path, header: dict, arrays: dict[str, np.ndarray]) -> tuple[Novelty | None, Conformal | None]:
    """The novelty sample and conformal scores of a data head that has them (heads before have not)."""
    if not ("novelty" in header or "conformal" in header):
        return None, None
    try:
        nov = Novelty.from_record(header["novelty"], arrays, header["backbone"]["dim"]) \
            if "novelty" in header else None
        conf = Conformal.from_record(header["conformal"], arrays) if "conformal" in header else None
    except (ValueError, TypeError, AttributeError) as e:
        raise HeadFileError(f"{p}: damaged featx head file ({e})") from None
    return nov, conf


# ---- legacy pickle heads (format 1) ------------------------------------------------------------

def _mac(key: bytes, header_wo_mac: dict, payload: bytes) -> str:
    h = hmac.new(key, json.dumps(header_wo_mac, sort_keys=True).encode(), hashlib.sha256)
    h.update(payload)
    return h.hexdigest()


TRUE_WORDS = ("1", "true", "yes")
FALSE_WORDS = ("", "0", "false", "no")


def trust_from_env() -> bool:
    """``FEATX_TRUST_HEADS`` read strictly: yes-words opt in, no-words (or unset) do not.

    Anything else is refused: a typo must never open the door to a pickle.
    """
    raw = os.environ.get(TRUST_ENV, "")
    v = raw.strip().lower()
    if v in TRUE_WORDS:
        return True
    if v in FALSE_WORDS:
        return False
    raise HeadFileError(f"{TRUST_ENV}={raw!r} is not understood: set it to 1, true or yes to trust "
                        "legacy pickle heads, or 0, false, no (or leave it unset) not to")


def _check_legacy_signature(p: Path, header: dict, payload: bytes, trust: bool) -> None:
    if trust or trust_from_env():
        return
    opt_in = (f"This is a head in featx's old format, a pickle, which can run code when loaded. "
              f"If you trust whoever wrote it, load it once with {TRUST_ENV}=1 (or load_head(path, "
              f"trust=True)): featx then rewrites it as data, which needs no trust.")
    mac = header.get("hmac_sha256")
    if mac is None:
        raise HeadFileError(f"{p}: unsigned head file, not written by this featx. {opt_in}")
    try:
        key, where = legacy_key()
    except HeadKeyError as e:
        raise HeadKeyError(f"{p}: {str(e).rstrip('.')}. {opt_in}") from None
    rest = {k: v for k, v in header.items() if k != "hmac_sha256"}
    if not hmac.compare_digest(str(mac), _mac(key, rest, payload)):
        raise HeadFileError(f"{p}: signature check failed: not signed with {where}, so it was "
                            f"written elsewhere or modified. {opt_in}")


def _load_legacy(p: Path, header: dict, payload: bytes):
    import joblib

    try:
        pipeline = joblib.load(io.BytesIO(payload))
    except Exception as e:
        raise HeadFileError(f"{p}: the head's pipeline cannot be loaded ({type(e).__name__}: {e}); "
                            f"it was written with scikit-learn {header.get('versions', {}).get('sklearn')}. "
                            "Install that version or fit the head again.") from None
    if not hasattr(pipeline, "predict_proba"):
        raise HeadFileError(f"{p}: the stored pipeline has no predict_proba")
    _upgrade(p, header, pipeline)
    return pipeline


def _upgrade(p: Path, header: dict, pipeline) -> None:
    """Rewrite a legacy head in the data format, so its pickle is never read again."""
    drop = {"format", "hmac_sha256", "payload_sha256", "payload_bytes", "versions", "created", "model",
            "content_sha256"}
    try:
        spec, arrays = encode(pipeline)
        payload = _npz(arrays)
        new = {k: v for k, v in header.items() if k not in drop}
        import sklearn

        new.update({"format": FORMAT, "model": spec, "upgraded_from": LEGACY_FORMAT,
                    "versions": {"featx": __version__, "sklearn": sklearn.__version__,
                                 "numpy": np.__version__, "python": platform.python_version()},
                    "created": header.get("created"),
                    "payload_sha256": hashlib.sha256(payload).hexdigest(),
                    "payload_bytes": len(payload)})
        new = json.loads(json.dumps(new, default=json_default))
        new["content_sha256"] = _content_sha(new, payload)
        hb = json.dumps(new).encode()
        write_bytes(p, MAGIC + f"{len(hb)}\n".encode() + hb + payload)
        log.warning("%s: rewrote this legacy pickle head in featx's data format (no key needed "
                    "from now on)", p)
    except (CodecError, OSError) as e:
        log.warning("%s: a legacy pickle head; could not rewrite it as data (%s). Fit it again "
                    "with `featx fit-head` to stop relying on its key.", p, e)


def key_paths() -> list[Path]:
    """Where a legacy head key may be: the config folder, then the cache folder old featx used."""
    cfg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    paths = [Path(cfg) / "featx" / "head.key"]
    cache = os.environ.get("FEATX_HOME") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "featx")
    paths.append(Path(cache) / "head.key")
    return paths


def legacy_key() -> tuple[bytes, str]:
    """The key that checks legacy heads, and where it came from.

    ``FEATX_HEAD_KEY`` when set and not blank, else the first key file of ``key_paths``
    that exists, which must be safe to trust (see ``read_key_file``). featx writes no
    new keys: heads are data now.
    """
    k = os.environ.get(KEY_ENV, "")
    if k.strip():
        return k.encode(), KEY_ENV
    for path in key_paths():
        if os.path.lexists(path):
            return read_key_file(path), f"this user's key ({path})"
    raise HeadKeyError(f"no head key found (looked for {KEY_ENV} and {', '.join(map(str, key_paths()))}), "
                       "so this legacy head cannot be checked")


def read_key_file(path: Path) -> bytes:
    """A legacy key file's 32 bytes, refused (HeadKeyError) unless only this user controls it.

    Refused: a symlink or non-regular file; empty, not 64 hex digits; not owned by this
    user; readable or writable by group or others; in a folder that others can write
    to or that another user owns.
    """
    def bad(why: str) -> HeadKeyError:
        return HeadKeyError(f"{path}: refusing this head key: {why}. Legacy heads are checked "
                            "with it; fix it, or fit the heads again (new heads need no key).")

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise bad("it is a symlink" if os.path.islink(path) else f"cannot open it ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise bad("not a regular file")
        if hasattr(os, "geteuid"):
            _check_owner(path, st, bad)
        text = f.read(200).strip()
    if not text:
        raise bad("it is empty")
    if len(text) != 64:
        raise bad(f"expected 64 hex digits (32 bytes), found {len(text)} characters")
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise bad("it is not hexadecimal") from None


def _check_owner(path: Path, st: os.stat_result, bad) -> None:
    me = os.geteuid()
    if st.st_uid != me:
        raise bad(f"owned by uid {st.st_uid}, not by you (uid {me})")
    if st.st_mode & 0o077:
        raise bad(f"group or others may read or write it (mode {stat.S_IMODE(st.st_mode):04o}); "
                  f"chmod 600 {path}")
    d = os.stat(path.parent)
    if d.st_uid not in (me, 0):
        raise bad(f"its folder {path.parent} is owned by uid {d.st_uid}")
    if d.st_mode & 0o022:
        raise bad(f"others may write to its folder {path.parent} (mode {stat.S_IMODE(d.st_mode):04o})")


# ---- which backbone ----------------------------------------------------------------------------

def head_backbone(head: Head, override: str | os.PathLike | Backbone | None = None) -> Backbone:
    """The backbone a head runs on: ``override`` if given (and it must match), else the
    head's recorded export directory, else its card re-exported; fingerprint always checked.
    Images are decoded as they were for the head (its ``preprocess.decoder``)."""
    card = head.meta.get("backbone", {}).get("card")
    name = card.get("name") if isinstance(card, dict) else card
    bdir = head.backbone_dir if head.backbone_dir and (Path(head.backbone_dir) / "model.json").is_file() else None
    made, fix = head._mismatch()
    return recorded_backbone(head.fingerprint, [bdir, name], override, head.preprocess.decoder, made, fix,
                             missing=f"head {head.path}: its backbone directory {head.backbone_dir} is "
                                     "gone; pass the backbone it was trained on with --backbone DIR")
