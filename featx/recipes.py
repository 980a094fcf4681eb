"""Named fine-tuning recipes: FinetuneConfig values measured to win in one regime (`featx finetune --recipe`).

A recipe fills the options a run is not given; an option given explicitly wins.
Each entry says where it was measured (docs/finetune.md has the runs).
"""

from __future__ import annotations

from featx.errors import FeatXError

#: name -> FinetuneConfig values
RECIPES: dict[str, dict] = {
    # Fashion-MNIST (28 px) on 2 CPU cores: at 200 images a class, 10 minutes of it score
    # 89.45% and 89.12% on the official 10k test (two seeds) where the multi-layer probe scores
    # 87.76% and the defaults keep the probe (64 px: 88.72-89.12%, three seeds); on the 60k,
    # in an hour, 94.61% (its last epoch 94.73%)
    "small-images": {
        "input_size": 80, "features": "last", "unfreeze": 6, "lr": 1e-3, "backbone_lr": 5e-4,
        "crop_scale": 0.5, "label_smoothing": 0.1, "erase": 0.25, "batch_size": 64, "patience": 0,
    },
}

#: one line per recipe for --help and errors
RECIPE_HELP = {
    "small-images": "small source images (about 28-64 px, e.g. Fashion-MNIST): an 80 px input, the top 6 "
                    "blocks, random erasing, many epochs (use it with --time-budget)",
}


def recipe_options(name: str | None) -> dict:
    """The option values recipe ``name`` sets (none for None); an unknown name is a FeatXError."""
    if name is None:
        return {}
    if name not in RECIPES:
        raise FeatXError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return dict(RECIPES[name])
