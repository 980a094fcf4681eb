"""The torchvision family: ``torchvision.models.get_model(arch)``; its classifier is the
card's ``classifier`` submodule; stages by architecture (ResNet: ``layer1``-``layer4``;
EfficientNet / MobileNet / ConvNeXt: the last module of each run of equal-shaped
``features``, the stem and, for EfficientNet / MobileNet, the head conv left out)."""

from __future__ import annotations

from featx.backbones.cards import BackboneCard
from featx.backbones.families import last_of_runs, probe_shapes
from featx.errors import ExportError, FeatXError, require


def instantiate(card: BackboneCard):
    """The card's architecture with random weights (no download)."""
    tv = require("torchvision", "torch")
    return tv.models.get_model(card.arch, weights=None)


def load_weights(model, card: BackboneCard, sd: dict, label: str) -> None:
    """Every tensor of ``sd`` into ``model`` (strict)."""
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise FeatXError(f"weights {label} do not fit {card.arch}: {str(e)[:500]}") from None


def drop_classifier(model, card: BackboneCard):
    """Replace the card's ``classifier`` submodule by an identity; returns the classifier."""
    torch = require("torch", "torch")
    classifier = model.get_submodule(card.classifier)
    model.set_submodule(card.classifier, torch.nn.Identity())
    return classifier


def stage_names(model, card: BackboneCard) -> list[str]:
    """The modules whose outputs are the card's stages, shallow to deep (by architecture)."""
    arch = card.arch
    if arch.startswith(("resnet", "resnext", "wide_resnet")):
        return ["layer1", "layer2", "layer3", "layer4"]
    if arch.startswith(("efficientnet", "mobilenet", "convnext")):
        n = len(model.features)
        # features.0 is the stem; EfficientNet's and MobileNet's last one is the head conv, whose
        # average is the last-layer embedding already
        names = [f"features.{i}" for i in range(1, n if arch.startswith("convnext") else n - 1)]
        return last_of_runs(names, probe_shapes(model, names, card.preprocess.input_size))
    raise ExportError(f"features='multi' has no recipe for {card.name!r} (arch {arch}); it knows timm "
                      "models, torchvision resnet*, efficientnet*, mobilenet*, convnext*")
