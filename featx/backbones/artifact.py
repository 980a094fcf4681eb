"""The backbone artifact: an ONNX file, its typed sidecar (model.json), its fingerprint.

An export directory holds ``model.onnx`` and ``model.json``; ``load_export``
opens one and checks the file has not changed; ``building`` gives a hidden
folder to write one in and publishes it with a rename. Everything above (torch
export, ONNX import, int8, resolving what a user typed) produces or consumes
these directories, and reads what they record through ``Sidecar``: the one
home of the fields of model.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featx.atomic import TMP_SUFFIX, write_text
from featx.backbones.cards import FEATURES, Preprocess
from featx.errors import FeatXError, MismatchError, OutputError

log = logging.getLogger(__name__)

SIDECAR = "model.json"
MODEL = "model.onnx"


class SidecarError(FeatXError):
    """A model.json that is not what featx wrote: bad JSON, a missing key, a wrong type."""


def fingerprint_of(onnx_bytes: bytes, pre: Preprocess) -> str:
    """Backbone fingerprint: hash of the ONNX bytes and the preprocessing spec."""
    h = hashlib.sha256(onnx_bytes)
    h.update(pre.canonical().encode())
    return h.hexdigest()[:16]


def safe_dirname(name: str) -> str:
    """A backbone name as a folder name (``timm:resnet18.a1_in1k`` -> ``timm-resnet18.a1_in1k``)."""
    return re.sub(r"[^A-Za-z0-9._@+-]", "-", name).lstrip(".") or "backbone"


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime against torch on real photos, measured at export."""

    images: int
    max_abs_diff: float
    max_rel_diff: float
    min_cosine: float | None = None


@dataclass(frozen=True)
class GuardReport:
    """What int8 did to the embeddings, on images the calibration did not see."""

    images: int
    cosine_mean: float
    cosine_min: float
    probe_accuracy_fp32: float | None
    probe_accuracy_int8: float | None
    max_loss: float | None = None
    forced: bool = False

    @property
    def loss_points(self) -> float | None:
        """Linear-probe accuracy lost by int8, in points (None without labels)."""
        if self.probe_accuracy_fp32 is None or self.probe_accuracy_int8 is None:
            return None
        return 100.0 * (self.probe_accuracy_fp32 - self.probe_accuracy_int8)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "loss_points": self.loss_points}


@dataclass(frozen=True)
class Quantization:
    """How an int8 export was made from its fp32 base, and what its guard measured."""

    method: str
    calibration_root: str
    calibration_images: int
    base_fingerprint: str
    seconds: float
    guard: GuardReport
    dtype: str = "int8"
    format: str = "QDQ"
    per_channel: bool = True
    weight_bits: int = 8  # 7: this CPU's int8 kernels saturate with 8-bit weights (featx.backbones.quantize)
    kernel_cosine: float | None = None  # fused int8 kernels vs the same graph in float, on calibration images

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["guard"] = self.guard.to_dict()
        return d


@dataclass(frozen=True)
class Sidecar:
    """model.json, typed: what a backbone is (name, dim, preprocessing, fingerprint, graph I/O)
    and where it came from (card, weights, parity, int8 calibration, source file).

    ``extra`` keeps the provenance featx records but never reads (versions,
    timings, the fine-tuning run), so a sidecar is written back unchanged.
    """

    name: str
    dim: int
    preprocess: Preprocess
    fingerprint: str
    input_name: str = "pixels"
    output_name: str = "embedding"
    precision: str = "fp32"
    export_format: int | None = None
    opset: int | None = None
    parity: Parity | None = None
    card: Mapping[str, Any] | None = None
    card_digest: str | None = None
    weights: str | None = None
    weights_sha256: str | None = None
    source: str | None = None
    source_sha256: str | None = None
    quantization: Quantization | None = None
    #: the feature recipe's record (featx.backbones.features); None: ``last``, the default
    features: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def feature_recipe(self) -> str:
        """The recipe the export was made with: ``last`` (nothing recorded) or ``multi``."""
        return str(self.features.get("name", "last")) if self.features else "last"

    @property
    def feature_version(self) -> int | None:
        """The recorded recipe's version (None for ``last``), to tell a stale export."""
        return self.features.get("version") if self.features else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of model.json (the keys featx has always written)."""
        d: dict[str, Any] = dict(self.extra)
        if self.features is not None:
            d["features"] = self.features
        d.update({
            "name": self.name, "card": self.card, "card_digest": self.card_digest, "weights": self.weights,
            "weights_sha256": self.weights_sha256, "source": self.source, "source_sha256": self.source_sha256,
            "dim": self.dim, "featx_export": self.export_format, "precision": self.precision,
            "preprocess": self.preprocess.to_dict(), "opset": self.opset,
            "input": {"name": self.input_name, "dtype": "uint8", "layout": "NHWC"},
            "output": {"name": self.output_name, "dtype": "float32"},
            "parity": dataclasses.asdict(self.parity) if self.parity else None,
            "quantization": self.quantization.to_dict() if self.quantization else None,
            "fingerprint": self.fingerprint,
        })
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Any, where: str | os.PathLike = "model.json") -> Sidecar:
        """Parse and check a model.json's content; a SidecarError names ``where`` and the key."""
        return _parse_sidecar(d, str(where))

    @classmethod
    def read(cls, path: str | os.PathLike) -> Sidecar:
        """Read ``path``; anything unreadable or malformed is a SidecarError naming the file."""
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise SidecarError(f"{path}: unreadable backbone metadata ({e})") from None
        return cls.from_dict(d, path)

    def write(self, path: str | os.PathLike) -> Path:
        """Atomically write model.json."""
        return write_text(path, json.dumps(self.to_dict(), indent=2))


# keys of model.json and the Python types a valid value has (bool is not an int here)
_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "dim": (int,), "fingerprint": (str,), "precision": (str,), "featx_export": (int,),
    "opset": (int,), "card": (dict,), "card_digest": (str,), "weights": (str,), "weights_sha256": (str,),
    "source": (str,), "source_sha256": (str,), "preprocess": (dict,), "input": (dict,), "output": (dict,),
    "parity": (dict,), "quantization": (dict,), "features": (dict,),
}
_REQUIRED = ("dim", "preprocess", "fingerprint")


def _field(d: dict, key: str, where: str) -> Any:
    v = d.get(key)
    want = _TYPES[key]
    if v is None:
        if key in _REQUIRED:
            raise SidecarError(f"{where}: {key!r} is missing; this is not a featx export (re-export it)")
        return None
    if isinstance(v, bool) or not isinstance(v, want):
        raise SidecarError(f"{where}: {key!r} must be {' or '.join(t.__name__ for t in want)}, "
                           f"got {type(v).__name__} {str(v)[:60]!r}; re-export it")
    return v


def _nested(cls, d: dict | None, where: str, key: str):
    if d is None:
        return None
    try:
        if cls is Quantization:
            g = {k: v for k, v in d["guard"].items() if k != "loss_points"}
            return Quantization(**{**d, "guard": GuardReport(**g)})
        return cls(**d)
    except (TypeError, KeyError, AttributeError) as e:
        raise SidecarError(f"{where}: {key!r} is malformed ({e}); re-export it") from None


def _features(rec: dict | None, where: str) -> dict | None:
    """The recorded feature recipe, checked once here: its name must be a known recipe."""
    if rec is not None and rec.get("name", "last") not in FEATURES:
        raise SidecarError(f"{where}: 'features.name' must be one of {', '.join(FEATURES)}, got "
                           f"{str(rec.get('name'))[:60]!r}; re-export it")
    return rec


def _parse_sidecar(d: Any, where: str) -> Sidecar:
    if not isinstance(d, dict):
        raise SidecarError(f"{where}: expected a JSON object, got {type(d).__name__}")
    v = {k: _field(d, k, where) for k in _TYPES}
    if v["dim"] <= 0:
        raise SidecarError(f"{where}: 'dim' must be positive, got {v['dim']}")
    try:
        pre = Preprocess.from_dict(v["preprocess"], stored=True)
    except (FeatXError, TypeError, ValueError) as e:
        raise SidecarError(f"{where}: bad 'preprocess' ({e}); re-export it") from None
    io_names = {}
    for key, default in (("input", "pixels"), ("output", "embedding")):
        name = (v[key] or {}).get("name", default)
        if not isinstance(name, str):
            raise SidecarError(f"{where}: '{key}.name' must be a string, got {type(name).__name__}")
        io_names[key] = name
    return Sidecar(
        name=v["name"] if v["name"] is not None else Path(where).parent.name, dim=v["dim"], preprocess=pre,
        fingerprint=v["fingerprint"], input_name=io_names["input"], output_name=io_names["output"],
        precision=v["precision"] or "fp32", export_format=v["featx_export"], opset=v["opset"],
        parity=_nested(Parity, v["parity"], where, "parity"), card=v["card"], card_digest=v["card_digest"],
        weights=v["weights"], weights_sha256=v["weights_sha256"], source=v["source"],
        source_sha256=v["source_sha256"],
        quantization=_nested(Quantization, v["quantization"], where, "quantization"),
        features=_features(v["features"], where),
        extra={k: x for k, x in d.items() if k not in _TYPES},
    )


@dataclass(frozen=True)
class Backbone:
    """An exported backbone: ``onnx_path`` takes uint8 NHWC pixels, gives (N, dim) float32.

    What the export recorded is ``sidecar`` (typed); ``meta`` is the same as a
    plain dict for older callers.
    """

    onnx_path: Path
    sidecar: Sidecar

    @property
    def name(self) -> str:
        return self.sidecar.name

    @property
    def preprocess(self) -> Preprocess:
        return self.sidecar.preprocess

    @property
    def dim(self) -> int:
        return self.sidecar.dim

    @property
    def fingerprint(self) -> str:
        return self.sidecar.fingerprint

    @property
    def input_name(self) -> str:
        return self.sidecar.input_name

    @property
    def meta(self) -> dict:
        """model.json as a dict (read-only view; kept for compatibility)."""
        return self.sidecar.to_dict()


def load_export(directory: str | os.PathLike, verify: bool = True) -> Backbone:
    """Open an export directory (model.onnx + model.json); verify the file is unchanged."""
    d = Path(directory)
    side = Sidecar.read(d / SIDECAR)
    onnx_path = d / MODEL
    if not onnx_path.is_file():
        raise FeatXError(f"{d}: model.onnx is missing")
    if verify:
        actual = fingerprint_of(onnx_path.read_bytes(), side.preprocess)
        if actual != side.fingerprint:
            raise MismatchError(
                f"{onnx_path} was modified after export (fingerprint {actual} != recorded "
                f"{side.fingerprint}). Re-export it (`featx export NAME --force`) or delete the directory."
            )
    return Backbone(onnx_path, side)


def cached_sidecar(directory: str | os.PathLike) -> Sidecar | None:
    """The sidecar of a finished export directory, or None (absent, half-written or damaged:
    the caller exports again; a damaged one is logged)."""
    d = Path(directory)
    if not ((d / SIDECAR).is_file() and (d / MODEL).is_file()):
        return None
    try:
        return Sidecar.read(d / SIDECAR)
    except SidecarError as e:
        log.warning("%s; exporting again", e)
        return None


# ---------------------------------------------------------------- building and publishing

STALE_AFTER_S = 86400.0
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
# .<dest>.<host>-<pid>.<random>.featx-tmp   (the owner is in the name so a dead one can be told)
_STAGING = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+" + re.escape(TMP_SUFFIX) + "$")


@contextlib.contextmanager
def building(dest: str | os.PathLike) -> Iterator[Path]:
    """A fresh hidden folder beside ``dest`` to write an export in, published to ``dest`` on success.

    On an exception (a failed parity check, a refused int8 model, Ctrl-C) the
    folder is removed and ``dest`` is left as it was. A process killed outright
    leaves its folder; the next ``building`` in that parent removes it
    (``clean_stale_builds``).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_builds(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{_HOST}-{os.getpid()}.", suffix=TMP_SUFFIX,
                                dir=dest.parent))
    try:
        yield tmp
        publish(tmp, dest)
    except OSError as e:  # a full disk mid-export: one line naming the export, not a traceback
        if isinstance(e, FeatXError) or e.errno not in OutputError.FULL:
            raise
        raise OutputError(dest, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def with_decoder(bb: Backbone, decoder: str | None) -> Backbone:
    """``bb`` with its JPEGs decoded by ``decoder`` (None: its own): another fingerprint,
    so the embeddings of two decoders never share a store namespace or a head."""
    if decoder is None or decoder == bb.preprocess.decoder:
        return bb
    pre = bb.preprocess.with_decoder(decoder)
    side = dataclasses.replace(bb.sidecar, preprocess=pre,
                               fingerprint=fingerprint_of(bb.onnx_path.read_bytes(), pre))
    return Backbone(bb.onnx_path, side)


def publish(tmp: Path, dest: Path) -> None:
    """Move a finished export directory into place: readers see the old one or the new one.

    An older ``dest`` is renamed aside first and removed after. If another process
    published the same export in between, its copy stays and ours is dropped.
    """
    old = tmp.with_name(tmp.name[: -len(TMP_SUFFIX)] + "_old" + TMP_SUFFIX)
    if dest.exists():
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:
        if not (dest / SIDECAR).is_file():
            raise
        log.info("%s was published by another process meanwhile; keeping that one", dest)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _owner_gone(host: str, pid: int) -> bool:
    if host != _HOST:
        return False  # another machine's (shared folder): only its age tells
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def clean_stale_builds(folder: str | os.PathLike, older_than_s: float = STALE_AFTER_S) -> int:
    """Remove export folders that killed processes left in ``folder``; returns how many.

    A build folder is stale when its process (named in the folder name) is gone
    from this machine, or when it is older than ``older_than_s``.
    """
    n = 0
    now = time.time()
    with contextlib.suppress(OSError):
        for p in Path(folder).iterdir():
            m = _STAGING.match(p.name)
            if not m or not p.is_dir() or p.is_symlink():
                continue
            with contextlib.suppress(OSError):
                old = now - p.stat().st_mtime > older_than_s
                if old or _owner_gone(m["host"], int(m["pid"])):
                    shutil.rmtree(p)
                    n += 1
                    log.info("removed %s, left by a killed export", p)
    return n
