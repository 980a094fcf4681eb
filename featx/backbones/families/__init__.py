"""Backbone families: how each family builds a card's network (``card.family`` in its TOML).

A family is one module here named after it (``timm``, ``torchvision``), found by that name
(``family(card)``): no table to edit, so a new family is that module plus its TOML cards.
Each module defines

- ``instantiate(card)``: the architecture with random weights (no download);
- ``load_weights(model, card, sd, label)``: a state dict (``featx.backbones.cards.weights``
  read it) into the model, every tensor accounted for (never a silent random init);
- ``drop_classifier(model, card)``: the ImageNet classifier replaced by an identity, and
  returned, so the model gives the pooled embedding;
- ``stage_names(model, card)``: the modules whose outputs are its stages, shallow to deep
  (the ``multi`` recipe of ``featx.backbones.features`` pools them).

``probe_shapes`` and ``last_of_runs`` are what families share to find stages.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from featx.backbones.cards import BackboneCard
from featx.errors import FeatXError, require

__all__ = ["family", "known_families", "last_of_runs", "probe_shapes"]


def known_families() -> list[str]:
    """The families featx can build (its modules here)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def family(card: BackboneCard) -> ModuleType:
    """The module that builds ``card``'s family (``featx.backbones.families.<card.family>``)."""
    name = card.family
    if name not in known_families():
        raise FeatXError(f"card {card.name!r}: unknown family {name!r}; featx builds "
                         f"{', '.join(known_families())} (a new family is a module in featx/backbones/families/)")
    return importlib.import_module(f"{__name__}.{name}")


def probe_shapes(model, names: list[str], input_size: int) -> dict[str, tuple[int, ...]]:
    """Output shapes of the modules ``names`` for one image at ``input_size``."""
    torch = require("torch", "torch")
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda _m, _a, out, n=n: shapes.__setitem__(n, tuple(out.shape))) for n in names]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def last_of_runs(names: list[str], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The last module of each run of modules with the same output shape (one per stage)."""
    return [n for i, n in enumerate(names) if i + 1 == len(names) or shapes[names[i + 1]] != shapes[n]]
