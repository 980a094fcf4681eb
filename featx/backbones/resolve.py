"""Resolve what a user typed (card name, timm:NAME, export or run directory, ONNX file) into a Backbone.

Exports and caches as needed; every path ends in ``load_export``, which
verifies the file has not changed since it was written.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from featx.backbones.artifact import SIDECAR, Backbone, load_export, with_decoder
from featx.backbones.cards import DEFAULT_BACKBONE, Preprocess, get_card
from featx.backbones.export import export_card
from featx.backbones.features import DEFAULT_FEATURES, check_features
from featx.backbones.onnx_import import import_onnx
from featx.errors import FeatXError, MismatchError, UnknownBackboneError


def card_features(backbone: str | os.PathLike | Backbone | None, features: str | None) -> str | None:
    """``features``, or ``DEFAULT_FEATURES`` (multi) when ``backbone`` names a card (or is None).

    The one place a user-facing default turns into a feature set: ``featx extract``,
    ``featx export NAME`` and the estimators all ask it, so they embed with the same export
    and share cached embeddings. A ready-made backbone (export or run directory, ONNX file,
    Backbone) keeps its own features (None). A ``timm:NAME`` gets ``last``: multi pools square
    feature maps, which a timm model need not have (a ViT's stages are tokens), and featx's
    cards are the ones whose multi recipe is tested.
    """
    if features is not None or isinstance(backbone, Backbone):
        return features
    spec = os.fspath(backbone) if backbone is not None else ""
    if spec.startswith("timm:"):
        return "last"
    made = spec and (Path(spec).is_dir() or spec.lower().endswith(".onnx") or "/" in spec or os.sep in spec)
    return None if made else DEFAULT_FEATURES


def resolve_backbone(spec: str | os.PathLike | Backbone | None = None,
                     weights: str | os.PathLike | None = None,
                     preprocess: Preprocess | None = None, features: str | None = None,
                     crop: str | None = None, layers: Sequence[str] | None = None) -> Backbone:
    """Resolve a backbone given by card name, ``timm:NAME``, export/run directory, or ONNX file.

    ``weights`` (a local checkpoint) applies to card and timm names; ``preprocess``
    to an ONNX file without a JSON spec beside it. ``features`` (``last``, ``multi``:
    featx.backbones.features) and ``crop`` (``center``, ``none``: Preprocess.crop)
    choose the export of a card name; ``features`` (and ``layers``, the tensors its
    ``multi`` pools) that of an ONNX file; for anything else they must match what the
    export recorded (None: whatever that is).
    """
    if isinstance(spec, Backbone):
        return _check_variant(spec, features, crop, spec.name)
    return export_backbone(spec, weights, preprocess, features=features, crop=crop, layers=layers)


def export_backbone(spec: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
                    preprocess: Preprocess | None = None, force: bool = False,
                    precision: str = "fp32", features: str | None = None, crop: str | None = None,
                    layers: Sequence[str] | None = None) -> Backbone:
    """``featx export``: the Backbone for ``spec``, exported (or imported) first if needed.

    ``force`` re-exports a card even when cached; ``precision="fp16"`` writes a
    float16 graph of a card; ``features="multi"`` pools intermediate stages into
    the embedding; ``crop="none"`` resizes whole images instead of the card's centre
    crop. A user's ONNX file is used as it is (fp32, its own output, the crop of its
    preprocessing spec).
    """
    spec = os.fspath(spec) if spec is not None else DEFAULT_BACKBONE
    p = Path(spec)
    if layers is not None and p.suffix.lower() != ".onnx":
        raise FeatXError(f"{spec}: layers= names tensors of your own ONNX file; a card's multi features "
                         "have their own layers")
    if p.is_dir():
        for sub in (p, p / "backbone"):
            if (sub / SIDECAR).is_file():
                return _check_variant(load_export(sub), features, crop, str(sub))
        raise FeatXError(f"{p}: not a featx export or run directory (no {SIDECAR})")
    if p.suffix.lower() == ".onnx":
        if not p.is_file():
            raise FeatXError(f"{p}: no such ONNX file")
        if precision != "fp32":
            raise FeatXError(f"{p}: --precision applies to backbone cards; your ONNX file is used as it is")
        bb = load_export(import_onnx(p, preprocess, features=features or "last", layers=layers))
        return _check_variant(bb, features, crop, str(p))
    if os.sep in spec or "/" in spec:
        raise UnknownBackboneError(f"{spec}: no such file or directory")
    card = get_card(spec)
    if crop is not None:
        card = dataclasses.replace(card, preprocess=dataclasses.replace(card.preprocess, crop=crop))
    return load_export(export_card(card, weights, force=force, precision=precision, features=features or "last"))


def check_fingerprint(bb: Backbone, fingerprint: str, made: str, fix: str) -> Backbone:
    """``bb`` if it is the backbone something was made with: its recorded ``fingerprint``
    (empty: not recorded, nothing to check). ``made`` says what was made with which backbone
    ("head h.featx was trained on backbone 'x'"), ``fix`` what to do about a mismatch."""
    if fingerprint and bb.fingerprint != fingerprint:
        raise MismatchError(f"{made} (fingerprint {fingerprint}), but the backbone given is {bb.name!r} "
                            f"(fingerprint {bb.fingerprint}). Embeddings of different backbones are not "
                            f"comparable: {fix}")
    return bb


def recorded_backbone(fingerprint: str, recorded: Sequence[str | os.PathLike | None],
                      override: str | os.PathLike | Backbone | None, decoder: str | None,
                      made: str, fix: str, missing: str) -> Backbone:
    """The backbone a head, table or estimator was made with, fingerprint-checked.

    ``override`` (what the user passed) if given; else the first of the ``recorded``
    specs (export directory, then card name: None entries skipped) that resolves; a
    recorded one that does not (its directory gone) gives way to the next, since the
    fingerprint proves whichever is used is the same network. Images are decoded with
    ``decoder`` (part of the fingerprint, carried by no spec). ``missing``: the error
    when nothing is recorded.
    """
    if override is not None:
        return check_fingerprint(with_decoder(resolve_backbone(override), decoder), fingerprint, made, fix)
    specs = [s for s in recorded if s]
    if not specs:
        raise FeatXError(missing)
    for i, spec in enumerate(specs):
        try:
            bb = with_decoder(resolve_backbone(spec), decoder)
        except FeatXError:
            if i == len(specs) - 1:
                raise
            continue
        return check_fingerprint(bb, fingerprint, made, fix)
    raise AssertionError("unreachable")  # the last spec returns or raises


def table_backbone(meta: dict, table: Path, override: str | os.PathLike | Backbone | None) -> Backbone:
    """The backbone that made a table: ``override``, or the export its metadata names (its
    card re-exported when the directory is gone); JPEGs decoded with the decoder the table
    records (``extract --decoder``)."""
    # the JPEG decoder travels with the table's preprocessing (extract --decoder): part of the
    # fingerprint, and no --backbone value carries it
    pre = meta.get("preprocess")
    decoder = pre.get("decoder") if isinstance(pre, dict) else None
    return recorded_backbone(
        meta.get("fingerprint", ""), [meta.get("backbone_path"), meta.get("backbone")], override, decoder,
        made=f"{table} was extracted with backbone {meta.get('backbone') or '?'!r}",
        fix="pass the backbone that made it with --backbone, or extract again",
        missing=f"{table}: no backbone recorded; pass --backbone")


def _check_variant(bb: Backbone, features: str | None, crop: str | None, where: str) -> Backbone:
    """A ready-made backbone (directory, ONNX file) gives the features and crop it was made with."""
    have = bb.sidecar.feature_recipe
    if features is not None and check_features(features) != have:
        raise FeatXError(f"{where} gives {have!r} features, not {features!r}: features= applies to "
                         "backbone cards and ONNX files (e.g. `featx export efficientnet_lite0 --features "
                         "multi`, `featx export mine.onnx --features multi`)")
    if crop is not None and crop != bb.preprocess.crop:
        raise FeatXError(f"{where} was made with crop {bb.preprocess.crop!r}, not {crop!r}: crop= applies to "
                         "backbone cards (e.g. `featx export efficientnet_lite0 --crop none`); for your "
                         "own ONNX file, set \"crop\" in its preprocessing JSON")
    return bb
