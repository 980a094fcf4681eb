"""Backbone families are found by name (featx.backbones.families): a new family is one module
plus its TOML card, with no table to edit in zoo.py or features.py."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import tomllib

from featx.backbones.cards import BackboneCard, list_cards
from featx.backbones.families import family, known_families
from featx.errors import FeatXError

HOOKS = ("instantiate", "load_weights", "drop_classifier", "stage_names")


def test_every_card_names_a_family_that_has_every_hook():
    assert known_families() == ["timm", "torchvision"]
    for card in list_cards():
        mod = family(card)
        assert all(callable(getattr(mod, h)) for h in HOOKS), (card.name, mod.__name__)


def test_an_unknown_family_says_which_exist():
    card = BackboneCard.from_dict({**list_cards()[0].to_dict(), "family": "keras"})
    with pytest.raises(FeatXError, match=r"unknown family 'keras'; featx builds timm, torchvision"):
        family(card)


TOY_FAMILY = '''
import torch


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.pool(self.stem(x)).flatten(1))


def instantiate(card):
    return Toy()


def load_weights(model, card, sd, label):
    model.load_state_dict(sd, strict=True)


def drop_classifier(model, card):
    head = model.head
    model.head = torch.nn.Identity()
    return head


def stage_names(model, card):
    return ["stem"]
'''

TOY_CARD = '''
name = "toy"
family = "toyfam"
arch = "toy"
weights = "pypi:toy_weights/toy.pth"
dim = 8
classifier = "head"

[preprocess]
input_size = 32
resize_size = 36
interpolation = "bilinear"
mean = [123.675, 116.28, 103.53]
std = [58.395, 57.12, 57.375]
'''


def test_a_new_family_is_one_module_and_one_card(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import featx.backbones.families as families
    from featx.backbones.zoo import build

    (tmp_path / "toyfam.py").write_text(textwrap.dedent(TOY_FAMILY))
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    card = BackboneCard.from_dict(tomllib.loads(TOY_CARD))
    try:
        assert "toyfam" in known_families()
        model, classifier, sha = build(card, pretrained=False)
        assert sha == "random-init" and classifier.out_features == 10
        import torch

        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 8)
        from featx.backbones.features import stage_names

        assert stage_names(model, card) == ["stem"]
    finally:
        sys.modules.pop("featx.backbones.families.toyfam", None)
        importlib.invalidate_caches()
