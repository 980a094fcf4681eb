"""Resolve what a user typed (card name, export or run directory, ONNX file) into a Backbone.

Exports and caches as needed; every path ends in ``load_export``, which
verifies the file has not changed since it was written.
"""

from __future__ import annotations

import os
from pathlib import Path

from featx.backbones.artifact import Backbone, load_export
from featx.backbones.cards import DEFAULT_BACKBONE, Preprocess, get_card
from featx.backbones.export import export_card
from featx.backbones.onnx_import import import_onnx
from featx.errors import FeatXError, UnknownBackboneError


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
        return load_export(import_onnx(p, preprocess))
    if os.sep in spec or "/" in spec:
        raise UnknownBackboneError(f"{spec}: no such file or directory")
    return load_export(export_card(get_card(spec), weights))
