"""Resolve what a user typed (card name, timm:NAME, export or run directory, ONNX file) into a Backbone.

Exports and caches as needed; every path ends in ``load_export``, which
verifies the file has not changed since it was written.
"""

from __future__ import annotations

import os
from pathlib import Path

from featx.backbones.artifact import SIDECAR, Backbone, load_export
from featx.backbones.cards import DEFAULT_BACKBONE, Preprocess, get_card
from featx.backbones.export import export_card
from featx.backbones.onnx_import import import_onnx
from featx.errors import FeatXError, UnknownBackboneError


def resolve_backbone(spec: str | os.PathLike | Backbone | None = None,
                     weights: str | os.PathLike | None = None,
                     preprocess: Preprocess | None = None) -> Backbone:
    """Resolve a backbone given by card name, ``timm:NAME``, export/run directory, or ONNX file.

    ``weights`` (a local checkpoint) applies to card and timm names; ``preprocess``
    to an ONNX file without a JSON spec beside it.
    """
    if isinstance(spec, Backbone):
        return spec
    return export_backbone(spec, weights, preprocess)


def export_backbone(spec: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
                    preprocess: Preprocess | None = None, force: bool = False,
                    precision: str = "fp32") -> Backbone:
    """``featx export``: the Backbone for ``spec``, exported (or imported) first if needed.

    ``force`` re-exports a card even when cached; ``precision="fp16"`` writes a
    float16 graph of a card. A user's ONNX file is used as it is (fp32 only).
    """
    spec = os.fspath(spec) if spec is not None else DEFAULT_BACKBONE
    p = Path(spec)
    if p.is_dir():
        for sub in (p, p / "backbone"):
            if (sub / SIDECAR).is_file():
                return load_export(sub)
        raise FeatXError(f"{p}: not a featx export or run directory (no {SIDECAR})")
    if p.suffix.lower() == ".onnx":
        if not p.is_file():
            raise FeatXError(f"{p}: no such ONNX file")
        if precision != "fp32":
            raise FeatXError(f"{p}: --precision applies to backbone cards; your ONNX file is used as it is")
        return load_export(import_onnx(p, preprocess))
    if os.sep in spec or "/" in spec:
        raise UnknownBackboneError(f"{spec}: no such file or directory")
    return load_export(export_card(get_card(spec), weights, force=force, precision=precision))
