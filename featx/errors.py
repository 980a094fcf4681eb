"""featx's exception types: one base class so callers can catch everything featx raises."""

from __future__ import annotations

import errno
import os


class FeatXError(Exception):
    """Base class of every error featx raises on purpose."""


class UnknownBackboneError(FeatXError, KeyError):
    """A backbone name or path that featx cannot resolve."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ImageError(FeatXError):
    """An image file that cannot be decoded; carries the path and the reason."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class DeviceError(FeatXError):
    """A device was asked for explicitly and cannot be honoured."""


class ExportError(FeatXError):
    """Export to ONNX failed, or the exported graph disagrees with torch."""


class StoreError(FeatXError):
    """The embedding store is unusable (wrong format version, unwritable, ...)."""


class OutputError(FeatXError, OSError):
    """An output file could not be written (disk full, folder not writable).

    Also an ``OSError`` with the original ``errno`` and ``strerror``, so code that
    handles write failures as OSError keeps working; its message is one line naming
    the file, the reason and what to do.
    """

    FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    DENIED = (errno.EACCES, errno.EROFS, errno.EPERM)

    def __init__(self, path: str | os.PathLike, err: OSError) -> None:
        super().__init__(err.errno, err.strerror or str(err), os.fspath(path))

    def __str__(self) -> str:
        if self.errno in self.FULL:
            return (f"cannot write {self.filename}: the disk is full (or a file size limit was hit: "
                    f"{self.strerror}); free space or write elsewhere, and run the same command again")
        if self.errno in self.DENIED:
            return f"cannot write {self.filename}: its folder is not writable ({self.strerror})"
        return f"cannot write {self.filename}: {self.strerror}"


class MismatchError(FeatXError):
    """Two artefacts that must belong together do not (head vs backbone, dims, ...)."""


class MissingDependencyError(FeatXError, ImportError):
    """An optional dependency is needed; the message names the pip extra."""


def require(module: str, extra: str):
    """Import ``module`` or raise a MissingDependencyError naming the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        # featx is not on PyPI: name the extra as a clone installs it (README, Installing)
        raise MissingDependencyError(
            f"{module} is needed for this; install featx's '{extra}' extra: pip install "
            f"'.[{extra}]' in a featx clone (README, Installing)"
        ) from e
