"""The backbone artifact: an ONNX file, its sidecar metadata, its fingerprint.

An export directory holds ``model.onnx`` and ``model.json``; ``load_export``
opens one and checks the file has not changed, ``publish`` moves a finished
one into place. Everything above (torch export, ONNX import, int8, resolving
what a user typed) produces or consumes these directories.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from featx.backbones.cards import Preprocess
from featx.errors import FeatXError, MismatchError


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
    pre = Preprocess.from_dict(meta["preprocess"], stored=True)
    fp = meta.get("fingerprint", "")
    if verify:
        actual = fingerprint_of(onnx_path.read_bytes(), pre)
        if actual != fp:
            raise MismatchError(
                f"{onnx_path} was modified after export (fingerprint {actual} != recorded {fp}). "
                "Re-export it (`featx export NAME --force`) or delete the directory."
            )
    return Backbone(meta.get("name", d.name), onnx_path, pre, int(meta["dim"]), fp, meta)


def with_decoder(bb: Backbone, decoder: str | None) -> Backbone:
    """``bb`` with its JPEGs decoded by ``decoder`` (None: its own): another fingerprint,
    so the embeddings of two decoders never share a store namespace or a head."""
    if decoder is None or decoder == bb.preprocess.decoder:
        return bb
    pre = bb.preprocess.with_decoder(decoder)
    return dataclasses.replace(bb, preprocess=pre, fingerprint=fingerprint_of(bb.onnx_path.read_bytes(), pre))


def publish(tmp: Path, dest: Path) -> None:
    """Move a finished export directory into place (a rename, so never half-written)."""
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
