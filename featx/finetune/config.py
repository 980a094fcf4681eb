"""What a fine-tuning run is asked to do: its config, its card, where it lives."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx.backbones.cards import DEFAULT_BACKBONE, BackboneCard, get_card
from featx.backbones.features import DEFAULT_FEATURES
from featx.backbones.resolve import card_features
from featx.errors import FeatXError
from featx.recipes import recipe_options

FINETUNE_FORMAT = 2  # 2: split.json records each file's content key


@dataclass
class FinetuneConfig:
    """Every knob of a run; saved as ``config.json`` so ``--resume`` continues the same run."""

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    unfreeze: int | str = 2
    epochs: int = 10
    lr: float = 1e-3  # head
    backbone_lr: float | None = None  # default lr / 10: pretrained features move less than the head
    layer_decay: float = 1.0  # each block below the top trains at this times the rate of the one above
    batch_size: int = 32
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    class_weight: str | None = "balanced"
    patience: int | None = 3  # epochs without val improvement before stopping; 0 or None: never
    val_fraction: float = 0.1
    lp_init: bool = True
    lp_C: float | str = "auto"
    pretrained: bool = True
    input_size: int | None = None  # override the card's input size (tests, quick CPU runs)
    crop_scale: float = 0.08  # smallest area fraction of the random crop (RandomResizedCrop scale)
    erase: float = 0.0  # chance that a training image gets one box of random pixels (random erasing)
    cutmix: float = 0.0  # chance that a training batch gets CutMix (loop.BatchMix)
    mixup: float = 0.0  # chance that a training batch gets mixup instead; cutmix + mixup <= 1
    # decay per step of an exponential moving average of the weights; the average is what each epoch
    # validates and the run keeps and exports. None: the trained weights themselves
    ema: float | None = None
    bn_stats: bool | None = None  # update BatchNorm statistics of trained blocks; None: only from scratch
    seed: int = 0
    # seconds for the whole run: epochs (at most ``epochs``) are chosen from the speed of the first steps
    time_budget: float | None = None
    # the embedding the linear layer reads: "last" (the pooled output) or "multi" (Head2Toe-style pooled
    # stages, featx.backbones.features): LP-FT then starts from the multi-layer probe. None: extract's
    # default for the backbone (multi for a card, last for timm:NAME), so the probe a run must beat
    # (and keeps when it cannot) is fit-head's default head
    features: str | None = None
    # the named recipe (featx.recipes) that filled the options not given; kept as a record
    recipe: str | None = None

    def __post_init__(self) -> None:
        if self.features is None:
            self.features = card_features(self.backbone, None) or DEFAULT_FEATURES
        if isinstance(self.weights, os.PathLike):  # a Path to a checkpoint is as good as its string
            self.weights = os.fspath(self.weights)

    @classmethod
    def from_dict(cls, d, source: str = "config.json") -> FinetuneConfig:
        """A config read back from a run's ``config.json``; anything malformed is a FeatXError naming it."""
        if not isinstance(d, dict):
            raise FeatXError(f"{source}: 'config' is not an object; the run's config was damaged or edited")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FeatXError(f"{source}: unknown options {unknown} (edited, or written by a newer featx)")
        # a run saved before the option existed read the pooled output: resume it as it was
        cfg = cls(**{"features": "last", **d})
        try:
            cfg.validate_types()
        except FeatXError as e:
            raise FeatXError(f"{source}: {e}; the run's config was damaged or edited") from None
        return cfg

    def validate_types(self) -> None:
        """Each option has the type its annotation names (``int | str``, ``float | None``, ...)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = [t.strip() for t in str(f.type).split("|")]
            if not any(_is_a(value, t) for t in allowed):
                raise FeatXError(f"{f.name} must be {' or '.join(allowed)}, got {value!r}")

    def validate(self, card: BackboneCard) -> None:
        from featx.finetune.loop import BatchMix, resolve_unfreeze

        self.validate_types()
        resolve_unfreeze(card, self.unfreeze)
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise FeatXError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience is not None and self.patience < 0:
            raise FeatXError(f"patience must be >= 0 (0: never stop early), got {self.patience}")
        if isinstance(self.lp_C, str) and self.lp_C != "auto":
            raise FeatXError(f"lp_C must be 'auto' or a number, got {self.lp_C!r}")
        if not self.lr > 0 or (self.backbone_lr is not None and not self.backbone_lr >= 0):
            raise FeatXError(f"learning rates must be > 0, got lr={self.lr}, backbone_lr={self.backbone_lr}")
        if not 0 < self.layer_decay <= 1:
            raise FeatXError(f"layer_decay must be in (0, 1] (1: one rate for every block), got {self.layer_decay}")
        if not 0 <= self.val_fraction < 1:
            raise FeatXError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 < self.crop_scale <= 1:
            raise FeatXError(f"crop_scale must be in (0, 1], got {self.crop_scale}")
        if not 0 <= self.erase <= 1:
            raise FeatXError(f"erase must be a probability in [0, 1], got {self.erase}")
        BatchMix(self.cutmix, self.mixup)  # raises on chances out of range
        if self.ema is not None and not 0 < self.ema < 1:
            raise FeatXError(f"ema must be a decay per step in (0, 1), e.g. 0.999, got {self.ema}")
        if self.class_weight not in (None, "balanced"):
            raise FeatXError(f"class_weight must be 'balanced' or None, got {self.class_weight!r}")
        if self.input_size is not None and not 16 <= self.input_size <= 1024:
            raise FeatXError(f"input_size must be in 16..1024, got {self.input_size}")
        if self.features not in ("last", "multi"):
            raise FeatXError(f"features must be 'last' or 'multi', got {self.features!r}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise FeatXError(f"time_budget must be > 0 seconds, got {self.time_budget}")
        recipe_options(self.recipe)  # raises on an unknown name
        if self.lp_init and not self.pretrained:
            raise FeatXError("LP init needs pretrained weights; pass lp_init=False to train from scratch")


def _is_a(value, type_name: str) -> bool:
    """Whether ``value`` fits one name of a field annotation; numpy numbers count, bools are not numbers."""
    if type_name == "None":
        return value is None
    if type_name == "bool":
        return isinstance(value, (bool, np.bool_))
    if isinstance(value, (bool, np.bool_)):
        return False
    if type_name == "int":
        return isinstance(value, numbers.Integral)
    if type_name == "float":
        return isinstance(value, numbers.Real) and math.isfinite(value)
    if type_name == "str":
        return isinstance(value, str)
    raise AssertionError(f"FinetuneConfig: no type check for {type_name!r}")  # a new field type: add it here


def card_for(cfg: FinetuneConfig) -> BackboneCard:
    """The config's card, with its preprocessing scaled to ``input_size`` when overridden."""
    if os.sep in cfg.backbone or "/" in cfg.backbone or cfg.backbone.endswith(".onnx"):
        raise FeatXError(f"--backbone {cfg.backbone}: fine-tuning starts from a backbone card (an "
                         "architecture with torch weights; see `featx models`), not an ONNX file or "
                         "run directory; pass --weights FILE.pth to start from your own checkpoint")
    card = get_card(cfg.backbone)
    if cfg.input_size is None or cfg.input_size == card.preprocess.input_size:
        return card
    p = card.preprocess
    s = int(cfg.input_size)
    pre = dataclasses.replace(p, input_size=s, resize_size=max(s, round(s * p.resize_size / p.input_size)))
    return dataclasses.replace(card, preprocess=pre)


def check_blocks(card: BackboneCard) -> None:
    """Raise if a card names a block its architecture does not have (random init, no weights)."""
    from featx.backbones.zoo import instantiate
    from featx.finetune.loop import card_block

    model = instantiate(card)
    for block in card.blocks:
        for path in block:
            card_block(model, card, path)


def default_run_dir(base: str | os.PathLike = "runs") -> Path:
    """runs/ft1, runs/ft2, ...: the first that does not exist."""
    base = Path(base)
    i = 1
    while (base / f"ft{i}").exists():
        i += 1
    return base / f"ft{i}"

