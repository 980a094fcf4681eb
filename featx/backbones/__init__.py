"""Backbones: cards (architecture + weights + preprocessing), export to ONNX, and the artifact.

Its modules sit on five floors of the import contract, with ``featx.embed`` between
the third and fourth (docs/architecture.md). Bottom up: ``cards`` (the TOML cards ship
as package data; ``cards.weights``: where a card's weights come from, fetched, read,
hashed; ``cards.timm_hub`` makes a card for any ``timm:NAME``); ``families`` (one module
per family: how it builds, loads, beheads and stages a model); ``artifact``
(Backbone, the typed model.json ``Sidecar``, fingerprint, load, build-and-publish),
``zoo`` (build a card's torch model through its family), ``same_pad`` (TF "SAME" padding as a module), ``features``
(the ``last`` / ``multi`` feature recipes), ``flops`` (FLOPs counted from an ONNX
graph); then ``export`` (torch -> ONNX), ``onnx_import`` (a user's ONNX file),
``quantize`` (int8); and ``resolve`` (name | directory | file -> Backbone; the
backbone a table records).
"""

from __future__ import annotations

from featx._lazy import lazy_exports

_EXPORTS = {
    "Backbone": "featx.backbones.artifact",
    "Sidecar": "featx.backbones.artifact",
    "load_export": "featx.backbones.artifact",
    "fingerprint_of": "featx.backbones.artifact",
    "BackboneCard": "featx.backbones.cards",
    "WeightsSource": "featx.backbones.cards.weights",
    "Preprocess": "featx.backbones.cards",
    "get_card": "featx.backbones.cards",
    "list_cards": "featx.backbones.cards",
    "DEFAULT_BACKBONE": "featx.backbones.cards",
    "export_card": "featx.backbones.export",
    "import_onnx": "featx.backbones.onnx_import",
    "quantize_backbone": "featx.backbones.quantize",
    "resolve_backbone": "featx.backbones.resolve",
    "export_backbone": "featx.backbones.resolve",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
