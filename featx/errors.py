"""featx's exception types: one base class so callers can catch everything featx raises."""

from __future__ import annotations


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
