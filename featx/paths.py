"""Where featx keeps its artefacts: FEATX_HOME (default ~/.cache/featx)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """featx's cache root; set FEATX_HOME to move it (tests use a temp dir)."""
    p = os.environ.get("FEATX_HOME")
    root = Path(p) if p else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "featx"
    root.mkdir(parents=True, exist_ok=True)
    return root


def exports_dir() -> Path:
    return home() / "backbones"


def default_store() -> Path:
    return home() / "store"
