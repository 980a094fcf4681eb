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
from featx.backbones.features import check_features, recorded_features
from featx.backbones.onnx_import import import_onnx
from featx.errors import FeatXError, UnknownBackboneError


def resolve_backbone(spec: str | os.PathLike | Backbone | None = None,
                     weights: str | os.PathLike | None = None,
                     preprocess: Preprocess | None = None, features: str | None = None) -> Backbone:
    """Resolve a backbone given by card name, ``timm:NAME``, export/run directory, or ONNX file.

    ``weights`` (a local checkpoint) applies to card and timm names; ``preprocess``
    to an ONNX file without a JSON spec beside it; ``features`` (``last``, ``multi``:
    featx.backbones.features) to card names; for anything else it must match
    what the export recorded (None: whatever that is).
    """
    if isinstance(spec, Backbone):
        return _check_features(spec, features, spec.name)
    return export_backbone(spec, weights, preprocess, features=features)


def export_backbone(spec: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
                    preprocess: Preprocess | None = None, force: bool = False,
                    precision: str = "fp32", features: str | None = None) -> Backbone:
    """``featx export``: the Backbone for ``spec``, exported (or imported) first if needed.

    ``force`` re-exports a card even when cached; ``precision="fp16"`` writes a
    float16 graph of a card; ``features="multi"`` pools intermediate stages into
    the embedding. A user's ONNX file is used as it is (fp32, its own output).
    """
    spec = os.fspath(spec) if spec is not None else DEFAULT_BACKBONE
    p = Path(spec)
    if p.is_dir():
        for sub in (p, p / "backbone"):
            if (sub / SIDECAR).is_file():
                return _check_features(load_export(sub), features, str(sub))
        raise FeatXError(f"{p}: not a featx export or run directory (no {SIDECAR})")
    if p.suffix.lower() == ".onnx":
        if not p.is_file():
            raise FeatXError(f"{p}: no such ONNX file")
        if precision != "fp32":
            raise FeatXError(f"{p}: --precision applies to backbone cards; your ONNX file is used as it is")
        return _check_features(load_export(import_onnx(p, preprocess)), features, str(p))
    if os.sep in spec or "/" in spec:
        raise UnknownBackboneError(f"{spec}: no such file or directory")
    return load_export(export_card(get_card(spec), weights, force=force, precision=precision,
                                   features=features or "last"))


def _check_features(bb: Backbone, features: str | None, where: str) -> Backbone:
    """A ready-made backbone (directory, ONNX file) gives the features it was exported with."""
    have = recorded_features(bb.sidecar.extra)
    if features is not None and check_features(features) != have:
        raise FeatXError(f"{where} gives {have!r} features, not {features!r}: features= applies to "
                         "backbone cards (e.g. `featx export efficientnet_lite0 --features multi`)")
    return bb
