"""Head files: a fitted sklearn pipeline + class names + the backbone it belongs to.

Layout (one file, conventionally ``*.joblib``)::

    FEATX-HEAD\\n                 magic line
    <header length>\\n            decimal byte count of the JSON header
    <JSON header>                 format, classes, fingerprint, preprocessing,
                                  training summary, versions, payload sha256 [, hmac]
    <payload>                     joblib pickle of the sklearn pipeline

Everything is checked before the payload is unpickled: the magic line, the
header, the payload's sha256, and an HMAC-SHA256 signature. featx signs every
head it writes with ``FEATX_HEAD_KEY`` when set (a team secret), else with a
random key kept in ``$FEATX_HOME/head.key`` (this user on this machine). A head
signed with another key, or not signed, is refused unless the caller opts in
(``trust=True``, or ``FEATX_TRUST_HEADS=1`` for the CLI): a pickle can run code
when loaded, so only the user decides to trust a stranger's file.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import platform
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from featx import __version__
from featx.backbones.artifact import Backbone, load_export, with_decoder
from featx.backbones.cards import Preprocess
from featx.backbones.resolve import resolve_backbone
from featx.errors import FeatXError, MismatchError

MAGIC = b"FEATX-HEAD\n"
FORMAT = 1
HEAD_FILE = "head.joblib"
KEY_ENV = "FEATX_HEAD_KEY"
TRUST_ENV = "FEATX_TRUST_HEADS"
MAX_HEADER = 16 * 1024 * 1024


class HeadFileError(FeatXError):
    """A head file that is not featx's, is damaged, or fails its integrity check."""


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

    @property
    def backbone_name(self) -> str:
        return self.meta.get("backbone", {}).get("name", "")

    def check_backbone(self, bb: Backbone) -> None:
        """Refuse a backbone other than the one the head was trained on."""
        if bb.fingerprint != self.fingerprint:
            raise MismatchError(
                f"head {self.path or ''} was trained on backbone {self.backbone_name!r} "
                f"(fingerprint {self.fingerprint}), but the backbone given is {bb.name!r} "
                f"(fingerprint {bb.fingerprint}). Embeddings of different backbones are not "
                "comparable: use the head's own backbone (omit --backbone) or fit a new head "
                "on embeddings from this backbone."
            )


def head_path(path: str | os.PathLike) -> Path:
    """A head file, or a (run) directory holding ``head.joblib``."""
    p = Path(path)
    if p.is_dir():
        p = p / HEAD_FILE
    if not p.is_file():
        raise HeadFileError(f"{path}: no such head file (expected a head .joblib written by "
                            "`featx fit-head`, or a run directory containing head.joblib)")
    return p


def _key() -> bytes:
    """The signing key: FEATX_HEAD_KEY, else this user's own random key (made on first use)."""
    k = os.environ.get(KEY_ENV)
    if k:
        return k.encode()
    from featx.paths import home

    path = home() / "head.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        pass
    key = os.urandom(32)
    tmp = path.with_name(f".head.key.{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex())
    try:
        os.link(tmp, path)  # first writer wins; a concurrent one reads the winner's key
    except FileExistsError:
        key = bytes.fromhex(path.read_text().strip())
    finally:
        tmp.unlink(missing_ok=True)
    return key


def _mac(key: bytes, header_wo_mac: dict, payload: bytes) -> str:
    h = hmac.new(key, json.dumps(header_wo_mac, sort_keys=True).encode(), hashlib.sha256)
    h.update(payload)
    return h.hexdigest()


def _plain(o):
    if hasattr(o, "tolist"):  # numpy scalars and arrays
        return o.tolist()
    if isinstance(o, (Path, os.PathLike)):
        return os.fspath(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)


def save_head(path: str | os.PathLike, pipeline, classes: list[str], backbone: Backbone,
              train_summary: dict) -> Path:
    """Write a head file (atomically); a directory gets ``head.joblib`` inside it.

    Signs it with HMAC-SHA256 (FEATX_HEAD_KEY, else this user's key in FEATX_HOME).
    """
    import joblib
    import sklearn

    if not hasattr(pipeline, "predict_proba"):
        raise FeatXError(f"the head pipeline {type(pipeline).__name__} has no predict_proba")
    p = Path(path)
    if p.is_dir():
        p = p / HEAD_FILE
    p.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    joblib.dump(pipeline, buf)
    payload = buf.getvalue()
    bdir = Path(backbone.onnx_path).parent.resolve()
    try:  # a head saved inside a run directory finds its backbone even if the run moves
        rel = os.path.relpath(bdir, p.parent.resolve())
    except ValueError:  # different drives on Windows
        rel = None
    header = {
        "format": FORMAT,
        "classes": [str(c) for c in classes],
        "backbone": {"name": backbone.name, "fingerprint": backbone.fingerprint, "dim": backbone.dim,
                     "dir": str(bdir), "dir_relative": rel, "card": backbone.meta.get("card")},
        "preprocess": backbone.preprocess.to_dict(),
        "train": train_summary,
        "versions": {"featx": __version__, "sklearn": sklearn.__version__,
                     "joblib": joblib.__version__, "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "payload_bytes": len(payload),
    }
    # numpy scalars/arrays in a caller's summary become plain JSON; the MAC is then taken
    # over exactly what load_head will parse back
    header = json.loads(json.dumps(header, default=_plain))
    header["hmac_sha256"] = _mac(_key(), header, payload)
    hb = json.dumps(header).encode()
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + f"{len(hb)}\n".encode() + hb + payload)
    os.replace(tmp, p)
    return p


def read_header(path: str | os.PathLike, trust: bool = False) -> tuple[dict, bytes, Path]:
    """Parse and verify a head file without unpickling anything; returns (header, payload, path).

    ``trust=True`` (or FEATX_TRUST_HEADS=1) accepts a head signed with another key
    or not signed; the sha256 integrity check still applies.
    """
    p = head_path(path)
    data = p.read_bytes()
    if not data.startswith(MAGIC):
        raise HeadFileError(
            f"{p}: not a featx head file (no FEATX-HEAD marker). featx only loads heads written "
            "by `featx fit-head` / featx.heads.headfile.save_head; it will not unpickle other files.")
    rest = data[len(MAGIC):]
    nl = rest.find(b"\n", 0, 20)
    try:
        n = int(rest[:nl])
        if not 0 < n <= MAX_HEADER:
            raise ValueError(n)
        header = json.loads(rest[nl + 1:nl + 1 + n])
        payload = rest[nl + 1 + n:]
        if not isinstance(header, dict):
            raise ValueError(header)
    except ValueError:
        raise HeadFileError(f"{p}: damaged featx head file (unreadable header); "
                            "fit the head again with `featx fit-head`") from None
    if header.get("format") != FORMAT:
        raise HeadFileError(f"{p}: head file format {header.get('format')!r}; this featx reads "
                            f"format {FORMAT}. Fit the head again with this featx.")
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise HeadFileError(
            f"{p}: integrity check failed (the payload's sha256 does not match its header); the "
            "file was modified or truncated. Refusing to load it; fit the head again.")
    trust = trust or os.environ.get(TRUST_ENV, "") not in ("", "0")
    if not trust:
        opt_in = (f"A head file contains a pickle, which can run code when loaded. If you trust "
                  f"whoever wrote it, load it anyway with {TRUST_ENV}=1 (or load_head(path, "
                  f"trust=True)); to share heads in a team, set the same {KEY_ENV} everywhere.")
        mac = header.get("hmac_sha256")
        if mac is None:
            raise HeadFileError(f"{p}: unsigned head file, not written by this featx. {opt_in}")
        rest_header = {k: v for k, v in header.items() if k != "hmac_sha256"}
        if not hmac.compare_digest(str(mac), _mac(_key(), rest_header, payload)):
            where = KEY_ENV if os.environ.get(KEY_ENV) else "this user's key ($FEATX_HOME/head.key)"
            raise HeadFileError(f"{p}: signature check failed: not signed with {where}, so it was "
                                f"written elsewhere or modified. {opt_in}")
    for k in ("classes", "backbone", "preprocess"):
        if k not in header:
            raise HeadFileError(f"{p}: damaged featx head file (header has no {k!r})")
    return header, payload, p


def load_head(path: str | os.PathLike, trust: bool = False) -> Head:
    """Load a head file (or a directory containing ``head.joblib``), verified before unpickling.

    Heads signed by another user or machine are refused unless ``trust`` (see read_header).
    """
    import joblib

    header, payload, p = read_header(path, trust=trust)
    try:
        pipeline = joblib.load(io.BytesIO(payload))
    except Exception as e:
        raise HeadFileError(f"{p}: the head's pipeline cannot be loaded ({type(e).__name__}: {e}); "
                            f"it was written with scikit-learn {header.get('versions', {}).get('sklearn')}. "
                            "Install that version or fit the head again.") from None
    if not hasattr(pipeline, "predict_proba"):
        raise HeadFileError(f"{p}: the stored pipeline has no predict_proba")
    bb = header["backbone"]
    bdir = bb.get("dir", "")
    rel = bb.get("dir_relative")
    if rel is not None and (p.parent / rel / "model.json").is_file():
        bdir = str((p.parent / rel).resolve())
    return Head(pipeline=pipeline, classes=list(header["classes"]), fingerprint=bb["fingerprint"],
                backbone_dir=bdir, preprocess=Preprocess.from_dict(header["preprocess"], stored=True),
                meta=header, path=p)


def head_backbone(head: Head, override: str | os.PathLike | Backbone | None = None) -> Backbone:
    """The backbone a head runs on: ``override`` if given (and it must match), else the
    head's recorded export directory, else its card re-exported; fingerprint always checked.
    Images are decoded as they were for the head (its ``preprocess.decoder``)."""
    if override is not None:
        bb = with_decoder(resolve_backbone(override), head.preprocess.decoder)
        head.check_backbone(bb)
        return bb
    if head.backbone_dir and (Path(head.backbone_dir) / "model.json").is_file():
        bb = with_decoder(load_export(head.backbone_dir), head.preprocess.decoder)
        head.check_backbone(bb)
        return bb
    card = head.meta.get("backbone", {}).get("card")
    name = card.get("name") if isinstance(card, dict) else card
    if name:
        bb = with_decoder(resolve_backbone(name), head.preprocess.decoder)
        head.check_backbone(bb)
        return bb
    raise FeatXError(f"head {head.path}: its backbone directory {head.backbone_dir} is gone; "
                     "pass the backbone it was trained on with --backbone DIR")
