"""A backbone ready to run: an ONNX file, its preprocessing and its fingerprint.

``resolve_backbone`` turns what a user typed (a card name, an export or
fine-tuning run directory, or their own ONNX file) into a ``Backbone``,
exporting and caching as needed and verifying the file has not changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .cards import DEFAULT_BACKBONE, Preprocess, get_card
from .errors import FeatXError, MismatchError, UnknownBackboneError


def fingerprint_of(onnx_bytes: bytes, pre: Preprocess) -> str:
    """Backbone fingerprint: hash of the ONNX bytes and the preprocessing spec."""
    h = hashlib.sha256(onnx_bytes)
    h.update(pre.canonical().encode())
    return h.hexdigest()[:16]


def read_sidecar(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise FeatXError(f"{path}: unreadable backbone metadata ({e})") from None


@dataclass(frozen=True)
class Backbone:
    """An exported backbone: ``onnx_path`` takes uint8 NHWC pixels, gives (N, dim) float32."""

    name: str
    onnx_path: Path
    preprocess: Preprocess
    dim: int
    fingerprint: str
    meta: dict

    @property
    def input_name(self) -> str:
        return self.meta.get("input", {}).get("name", "pixels")


def load_export(directory: str | os.PathLike, verify: bool = True) -> Backbone:
    """Open an export directory (model.onnx + model.json); verify the file is unchanged."""
    d = Path(directory)
    meta = read_sidecar(d / "model.json")
    onnx_path = d / "model.onnx"
    if not onnx_path.is_file():
        raise FeatXError(f"{d}: model.onnx is missing")
    pre = Preprocess.from_dict(meta["preprocess"])
    fp = meta.get("fingerprint", "")
    if verify:
        actual = fingerprint_of(onnx_path.read_bytes(), pre)
        if actual != fp:
            raise MismatchError(
                f"{onnx_path} was modified after export (fingerprint {actual} != recorded {fp}). "
                "Re-export it (`featx export NAME --force`) or delete the directory."
            )
    return Backbone(meta.get("name", d.name), onnx_path, pre, int(meta["dim"]), fp, meta)


def resolve_backbone(spec: str | os.PathLike | Backbone | None = None,
                     weights: str | os.PathLike | None = None,
                     preprocess: Preprocess | None = None) -> Backbone:
    """Resolve a backbone given by card name, export/run directory, or ONNX file."""
    if isinstance(spec, Backbone):
        return spec
    spec = os.fspath(spec) if spec is not None else DEFAULT_BACKBONE
    p = Path(spec)
    if p.is_dir():
        for sub in (p, p / "backbone"):
            if (sub / "model.json").is_file():
                return load_export(sub)
        raise FeatXError(f"{p}: not a featx export or run directory (no model.json)")
    if p.suffix.lower() == ".onnx":
        if not p.is_file():
            raise FeatXError(f"{p}: no such ONNX file")
        from .user_onnx import import_onnx

        return load_export(import_onnx(p, preprocess))
    if os.sep in spec or "/" in spec:
        raise UnknownBackboneError(f"{spec}: no such file or directory")
    from .export import export_card

    return load_export(export_card(get_card(spec), weights))
