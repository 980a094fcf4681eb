"""Lazy re-exports for package ``__init__`` files.

A package lists its public names and the module each lives in; the module is
imported on first use. ``import featx.embed`` then stays cheap (no onnxruntime,
no sklearn), and importing a low layer never runs the ``__init__`` of a high one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``, whose public ``name`` lives in ``exports[name]``."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
