"""Where featx keeps its artefacts: FEATX_HOME (default ~/.cache/featx)."""

from __future__ import annotations

import os
from pathlib import Path

from featx.errors import FeatXError


def _folder(p: Path) -> Path:
    """``p`` made if missing; a FEATX_HOME that cannot be a folder is one line, not a traceback."""
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = f"FEATX_HOME={os.environ['FEATX_HOME']}" if os.environ.get("FEATX_HOME") else "featx's cache"
        why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) \
            else "it is not writable" if isinstance(e, PermissionError) else e.strerror or str(e)
        raise FeatXError(f"{where}: cannot use {p} ({why}); set FEATX_HOME to a folder you can write, "
                         "e.g. FEATX_HOME=~/.cache/featx") from None
    return p


def home() -> Path:
    """featx's cache root; set FEATX_HOME to move it (tests use a temp dir)."""
    p = os.environ.get("FEATX_HOME")
    root = Path(p) if p else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "featx"
    return _folder(root)


def exports_dir() -> Path:
    """Where exported backbones are cached (made here, so an unusable FEATX_HOME says so)."""
    return _folder(home() / "backbones")


def default_store() -> Path:
    return home() / "store"
