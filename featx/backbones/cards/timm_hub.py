"""What timm says about one of its models: card fields, stages, where its weights are published.

``timm:NAME`` names any timm model (``timm:resnet50.a1_in1k``,
``timm:vit_small_patch14_dinov2``). Nothing here is a second table: the
preprocessing is ``timm.data.resolve_data_config`` of the weight set's
``pretrained_cfg``; the embedding dim and the unfreezable stages come from the
model timm builds with ``num_classes=0`` on the meta device (no memory, no
weights). This module returns plain data; ``featx.backbones.cards`` turns it
into a BackboneCard (and lists the pretrained weight sets, ``list_pretrained``), and
``featx.backbones.cards.weights`` finds and fetches the files, so it needs nothing from
either (no import circle).
"""

from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass
from typing import Any

from featx.errors import FeatXError, UnknownBackboneError, require

log = logging.getLogger(__name__)

PREFIX = "timm:"
SUPPORTED_CROP_MODE = "center"


@dataclass(frozen=True)
class TimmWeights:
    """One of timm's pretrained weight sets, as ``featx models --timm`` lists it."""

    name: str  # "timm:<arch>.<tag>", usable as --backbone
    input_size: int
    interpolation: str
    crop_pct: float
    license: str
    offline: bool  # weights already in the Hugging Face hub cache
    unsupported: str  # why featx cannot use it yet, or ""


def model_name(spec: str) -> str:
    """``timm:resnet50.a1_in1k`` -> ``resnet50.a1_in1k``."""
    return spec[len(PREFIX):] if spec.startswith(PREFIX) else spec


def pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained config of ``name`` (``arch`` or ``arch.tag``); unknown names suggest others."""
    timm = require("timm", "torch")
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name) if timm.is_model(name) else None
    except RuntimeError:  # an architecture timm has, with a tag it does not
        cfg = None
    if cfg is None and timm.is_model(name) and "." not in name:
        # an architecture without published weights: its default config still says how it sees pixels
        with _meta_device():
            cfg = timm.create_model(name, pretrained=False).pretrained_cfg
        return dict(cfg)
    if cfg is None:
        known = timm.list_models() + timm.list_models(pretrained=True)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
        hint = f" Did you mean {' or '.join(PREFIX + c for c in close)}?" if close else ""
        raise UnknownBackboneError(
            f"timm has no model {name!r}.{hint} Run `featx models --timm 'PATTERN'` to list its "
            "pretrained weight sets."
        )
    return cfg.to_dict()


def preprocess_fields(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """featx Preprocess fields from timm's resolved eval data config (mean/std on the 0-255 scale).

    timm's eval transform resizes the shorter side to ``floor(size / crop_pct)``
    and centre-crops ``size``: exactly featx's decoder. Weight sets that squash or
    pad instead are refused rather than fed pixels they were not trained on.
    """
    from timm.data import resolve_data_config

    data = resolve_data_config(pretrained_cfg=cfg)
    _, h, w = data["input_size"]
    mode = data.get("crop_mode") or SUPPORTED_CROP_MODE
    why = unsupported_reason(h, w, mode)
    if why:
        raise FeatXError(f"{PREFIX}{name}: {why}")
    return {
        "input_size": int(h),
        "resize_size": math.floor(h / data["crop_pct"]),
        "interpolation": data["interpolation"],
        "mean": [round(255.0 * v, 6) for v in data["mean"]],
        "std": [round(255.0 * v, 6) for v in data["std"]],
    }


def unsupported_reason(h: int, w: int, crop_mode: str) -> str:
    """Why featx's decoder cannot reproduce this preprocessing, or ""."""
    if h != w:
        return f"its input is {h}x{w} px; featx feeds square crops only"
    if crop_mode != SUPPORTED_CROP_MODE:
        return (f"its preprocessing uses crop_mode={crop_mode!r}; featx's decoder resizes the "
                "shorter side and centre-crops (timm's 'center'), so pick another weight set")
    return ""


def card_fields(spec: str) -> dict[str, Any]:
    """The fields of a BackboneCard for ``timm:NAME`` (name canonicalised to ``timm:arch.tag``)."""
    name = model_name(spec)
    cfg = pretrained_cfg(name)
    arch, tag = cfg.get("architecture") or name.split(".")[0], cfg.get("tag")
    full = f"{arch}.{tag}" if tag else arch
    pre = preprocess_fields(full, cfg)
    dim, blocks = _shape(full, pre["input_size"])
    classifier = cfg.get("classifier") or ""
    return {
        "name": PREFIX + full, "family": "timm", "arch": full, "weights": PREFIX + full, "dim": dim,
        "preprocess": pre, "classifier": ",".join(classifier) if isinstance(classifier, (list, tuple))
        else classifier, "key_mapping": "direct", "blocks": blocks, "license": cfg.get("license") or "",
        "description": f"timm {full} (pooled pre-logits)",
    }


def _meta_device():
    torch = require("torch", "torch")
    return torch.device("meta")


def _shape(name: str, size: int) -> tuple[int, list[list[str]]]:
    """(embedding dim, unfreezable blocks top first) of the headless model, built on the meta device."""
    timm = require("timm", "torch")
    torch = require("torch", "torch")
    with _meta_device():
        model = timm.create_model(name, pretrained=False, num_classes=0)
        try:
            dim = int(model(torch.zeros(1, 3, size, size)).shape[-1])
        except Exception:  # a model that computes on values at build time: trust its attributes
            dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return dim, stage_blocks(model)


def stage_blocks(model) -> list[list[str]]:
    """Unfreezable units, top first, cut at the stage boundaries timm's ``feature_info`` names.

    What follows the last stage (final norm, pre-logits) goes with the top
    stage; the stem goes with the first; modules without parameters are left out.
    """
    boundaries = [f["module"] for f in getattr(model, "feature_info", []) or []]
    expand = {b.split(".")[0] for b in boundaries if "." in b}
    units: list[str] = []
    for child_name, child in model.named_children():
        if child_name in expand:
            units += [f"{child_name}.{n}" for n, _ in child.named_children()]
        else:
            units.append(child_name)
    blocks: list[list[str]] = [[]]
    for unit in units:
        blocks[-1].append(unit)
        if unit in boundaries:
            blocks.append([])
    if len(blocks) > 1:
        head_side = blocks.pop()
        blocks[-1] += head_side  # final norm, pre-logits: they go with the top stage
    has_params = {u for u in units if any(True for _ in model.get_submodule(u).parameters())}
    kept = [[u for u in b if u in has_params] for b in blocks]
    return [b for b in reversed(kept) if b]


def weights_location(name: str) -> tuple[str | None, list[str], str | None]:
    """(Hugging Face repo, candidate file names, plain URL) of ``name``'s published weights."""
    cfg = pretrained_cfg(name)
    repo = cfg.get("hf_hub_id")
    if repo:
        own = cfg.get("hf_hub_filename")
        # timm's own order: the safetensors alternative first, then the pickle
        files = ([own.replace("pytorch_model.bin", "model.safetensors"), own] if own
                 else ["model.safetensors", "pytorch_model.bin"])
        return repo, list(dict.fromkeys(files)), None
    return None, [], cfg.get("url") or None
