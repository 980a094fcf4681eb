"""Feature recipes: which layers of a backbone make its embedding, and how they are pooled.

``last`` is the backbone's own pooled output, what every export gave before
recipes existed. ``multi`` follows Head2Toe (Evci et al., ICML 2022): a linear
probe over pooled *intermediate* features beats the last-layer probe, most on
data unlike ImageNet. It concatenates, inside the ONNX graph,

- the global average of every stage,
- a 2x2 average of the last four stages (where in the image a feature is),
- the last layer's global average (the ``last`` embedding itself),

into one fixed-length vector: still one output, still uint8 NHWC in, so the
store, the heads and the tables need no change. For efficientnet_lite0 at
224 px: 784 + 4 x 704 + 1280 = 4880 dims.

Stages come from the card's family (``stage_names``, ``featx.backbones.families``):
timm EfficientNet / MobileNetV3 (the Lite cards): each of ``blocks``; other timm
models: their ``feature_info`` modules; torchvision ResNet: ``layer1``-``layer4``;
torchvision EfficientNet / MobileNet / ConvNeXt: the last module of each run
of equal-shaped ``features`` (the stem and, for EfficientNet / MobileNet, the
head conv, whose average is the last layer, left out). The recipe, with every
segment's place in the vector, is recorded in the sidecar (``features``); the
fingerprint covers it because the pooling is part of the ONNX graph.

A user's own ONNX file (``layer_recipe``): the layers are tensors of its graph,
named by the user or picked as the last 4-D map at each spatial size, and the
same pooling is added to the graph by featx.backbones.onnx_import.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from featx.backbones.cards import FEATURES, BackboneCard
from featx.backbones.families import family, probe_shapes
from featx.errors import ExportError, require

# What `featx extract` exports a card with when no --features is given: multi won on every data
# set measured (bench/default_features.py, docs/heads.md "Which features"); fit-head then picks
# the whole vector or its last segment by CV (featx.heads.segment)
DEFAULT_FEATURES = "multi"
RECIPE_VERSION = 1  # bump when a recipe's layers or pooling change: cached exports are redone
GRID = 2  # the last GRID_STAGES stages are also averaged over a GRID x GRID grid
GRID_STAGES = 4
LAST = "<pooled output>"  # the segment that is the backbone's own embedding


@dataclass(frozen=True)
class Segment:
    """One piece of the multi embedding: ``module``'s output averaged over a ``grid`` x ``grid``
    grid (1: global average), ``channels * grid**2`` values starting at ``start``."""

    module: str
    channels: int
    grid: int
    start: int

    @property
    def stop(self) -> int:
        return self.start + self.channels * self.grid * self.grid


@dataclass(frozen=True)
class FeatureRecipe:
    """A ``multi`` recipe resolved for one backbone at one input size."""

    name: str
    stages: tuple[str, ...]
    sizes: tuple[int, ...]  # spatial side of each stage's output at the card's input size
    segments: tuple[Segment, ...]
    version: int = RECIPE_VERSION

    @property
    def dim(self) -> int:
        return self.segments[-1].stop

    def to_dict(self) -> dict[str, Any]:
        """What the sidecar records under ``features``."""
        return {"name": self.name, "version": self.version, "dim": self.dim,
                "pooling": f"global average of every stage + {GRID}x{GRID} average of the last "
                           f"{GRID_STAGES} stages + the last layer's global average",
                "segments": [{"module": s.module, "channels": s.channels, "grid": s.grid,
                              "start": s.start, "stop": s.stop} for s in self.segments]}


def check_features(features: str) -> str:
    if features not in FEATURES:
        raise ExportError(f"features {features!r} is not one of {', '.join(FEATURES)}")
    return features




def stage_names(model, card: BackboneCard) -> list[str]:
    """The modules whose outputs are a card's stages, shallow to deep (its family's
    ``stage_names``: featx.backbones.families)."""
    return family(card).stage_names(model, card)


def make_recipe(model, card: BackboneCard) -> FeatureRecipe:
    """The ``multi`` recipe of ``model`` (a headless ``zoo.build`` backbone) for ``card``."""
    stages = stage_names(model, card)
    if len(stages) < GRID_STAGES:
        raise ExportError(f"{card.name}: features='multi' needs at least {GRID_STAGES} stages, found {stages}")
    shapes = probe_shapes(model, stages, card.preprocess.input_size)
    bad = {n: s for n, s in shapes.items() if len(s) != 4 or s[2] != s[3]}
    if bad:
        raise ExportError(f"{card.name}: features='multi' pools square NCHW feature maps; these stages "
                          f"give {bad} (transformer tokens are not supported)")
    segs = _segments(stages, stages[-GRID_STAGES:], {n: s[1] for n, s in shapes.items()}, card.dim)
    return FeatureRecipe("multi", tuple(stages), tuple(shapes[n][2] for n in stages), segs)


def _segments(stages: list[str], gridded: list[str], channels: dict[str, int],
              last_dim: int) -> tuple[Segment, ...]:
    """Global averages of ``stages``, then GRID x GRID averages of ``gridded``, then the last layer."""
    segs: list[Segment] = []
    start = 0
    for grid, names in ((1, stages), (GRID, gridded)):
        for n in names:
            segs.append(Segment(n, channels[n], grid, start))
            start = segs[-1].stop
    segs.append(Segment(LAST, last_dim, 1, start))
    return tuple(segs)


def layer_recipe(layers: Mapping[str, tuple[int, int]], last_dim: int) -> FeatureRecipe:
    """The ``multi`` recipe over named layers of a user's ONNX graph (featx.backbones.onnx_import).

    ``layers`` maps each tensor name, shallow to deep, to its (channels, side) at the
    input size; ``last_dim`` is the width of the model's own pooled output. The same
    recipe as a card's: the global average of every layer, a GRID x GRID average of the
    last GRID_STAGES (those whose maps are at least GRID x GRID), the model's output last.
    """
    names = list(layers)
    gridded = [n for n in names[-GRID_STAGES:] if layers[n][1] >= GRID]
    segs = _segments(names, gridded, {n: c for n, (c, _) in layers.items()}, last_dim)
    return FeatureRecipe("multi", tuple(names), tuple(side for _, side in layers.values()), segs)


class _Tap:
    """Forward hook keeping a stage's output for the forward pass in progress.

    A hook object, not a closure over the wrapper: ``copy.deepcopy`` (static
    padding, float16 copies) then copies the taps and the hooks that point at
    them together, so a copy reads its own stages.
    """

    def __init__(self) -> None:
        self.out = None

    def __call__(self, _module, _args, output) -> None:
        self.out = output


def _cells(size: int, grid: int) -> list[tuple[int, int]]:
    """The windows of adaptive average pooling: [floor(i*size/grid), ceil((i+1)*size/grid))."""
    return [(i * size // grid, -(-(i + 1) * size // grid)) for i in range(grid)]


def grid_cells(size: int) -> list[tuple[int, int]]:
    """The [start, stop) windows of a GRID x GRID average along one side of ``size`` (as
    ``adaptive_avg_pool2d``): what the ONNX import slices, the same as the card exports."""
    return _cells(size, GRID)


def multi_features(backbone, card: BackboneCard):
    """(module, recipe): ``module`` maps float NCHW to the (N, recipe.dim) ``multi`` embedding.

    ``backbone`` is the module's from then on: its stages carry forward hooks.

    The 2x2 averages are static slices (the export has one input size):
    ``adaptive_avg_pool2d`` does the same but does not export to ONNX when the
    map's side (7 at 224 px) is not a multiple of 2.
    """
    torch = require("torch", "torch")
    recipe = make_recipe(backbone, card)

    class MultiFeatures(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.taps = [_Tap() for _ in recipe.stages]
            for name, tap in zip(recipe.stages, self.taps, strict=True):
                backbone.get_submodule(name).register_forward_hook(tap)
            self.grid = [_cells(s, GRID) for s in recipe.sizes[-GRID_STAGES:]]

        def forward(self, x):
            last = self.backbone(x)
            maps = [t.out for t in self.taps]
            for t in self.taps:
                t.out = None  # hold no activations between calls
            parts = [m.mean((2, 3)) for m in maps]
            for m, cells in zip(maps[-GRID_STAGES:], self.grid, strict=True):
                grid = [m[:, :, h0:h1, w0:w1].mean((2, 3)) for h0, h1 in cells for w0, w1 in cells]
                parts.append(torch.stack(grid, 2).flatten(1))  # channel-major, as adaptive_avg_pool2d
            parts.append(last)
            return torch.cat(parts, 1)

    return MultiFeatures().eval(), recipe
