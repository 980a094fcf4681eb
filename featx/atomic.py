"""Write a file so that readers see the old file or the new one, never a mix.

Every output featx writes (tables, reports, heads, CSVs, run files) goes to a
unique temporary name in the same folder, is fsynced, then renamed over the
target. Two processes writing the same path leave one complete file from one
of them. A killed writer leaves a ``.<name>.<random>.featx-tmp`` file behind;
``clean_stale_temporaries`` removes those older than a day.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from featx.errors import FeatXError, OutputError

__all__ = ["TMP_SUFFIX", "atomic_path", "clean_stale_temporaries", "figure", "result_file", "save_figure",
           "write_bytes", "write_text"]

TMP_SUFFIX = ".featx-tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on success it is fsynced and renamed to ``path``.

    The caller writes the temporary file by name (pyarrow, matplotlib, joblib...). On an
    exception the temporary file is removed and ``path`` is left as it was; a full disk
    or an unwritable folder is an ``OutputError`` (a FeatXError and an OSError) naming ``path``.
    """
    dest = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=TMP_SUFFIX, dir=dest.parent or ".")
    except OSError as e:
        if e.errno in OutputError.FULL + OutputError.DENIED:
            raise OutputError(dest, e) from None
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, dest)
    except OSError as e:
        # a full disk while writing the temporary: one line naming the output, not a traceback
        if isinstance(e, FeatXError) or e.errno not in OutputError.FULL:
            raise
        raise OutputError(dest, e) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically replace ``path`` with ``data``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    return write_bytes(path, text.encode("utf-8"))


def clean_stale_temporaries(folder: str | os.PathLike, older_than_s: float = 86400.0,
                            patterns: tuple[str, ...] = (f".*{TMP_SUFFIX}",)) -> int:
    """Remove temporaries of killed writers in ``folder``: files matching one of ``patterns``
    (``atomic_path``'s temporaries by default; the store adds the names older featx used)
    untouched for ``older_than_s``. Returns how many were removed."""
    n = 0
    now = time.time()
    with contextlib.suppress(OSError):
        for p in (q for pattern in patterns for q in Path(folder).glob(pattern)):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > older_than_s:
                    p.unlink()
                    n += 1
    return n


def _read_umask() -> int:
    # read once at import (umask can only be read by setting it, which races with threads)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates 0600; the final file gets the mode a plain open() would give it
_UMASK = _read_umask()


@contextlib.contextmanager
def figure(path: str | os.PathLike, **subplots):
    """``with figure(path, figsize=...) as (fig, axes):`` draw; the PNG is then written (``save_figure``).

    The one way featx makes a figure: matplotlib's Agg backend (no display, never a
    window), ``plt.subplots(**subplots)``, laid out and written atomically on success,
    and closed in every case (an error while drawing writes nothing and leaks no figure).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
    except BaseException:
        plt.close(fig)
        raise
    save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Lay out a matplotlib figure, write it as PNG atomically, and close it."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def result_file(out: str | os.PathLike) -> tuple[Path, str]:
    """``out`` checked as a results file (.csv, .tsv or .json) with its folder made:
    (path, lower-case suffix). A clear FeatXError otherwise, before any work is written."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".tsv", ".json"):
        raise FeatXError(f"{out}: output must end in .csv, .tsv or .json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FeatXError(f"cannot create {out.parent}: {e.strerror or e}") from None
    return out, suffix
