"""How library code reports progress: a callback the caller renders (the CLI draws a bar).

Library code never prints. A long job calls ``progress(stage, done, total)``
as it goes; ``no_progress`` is the default when nobody is watching.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["ProgressFn", "no_progress"]

#: ``progress(stage, done, total)``: ``stage`` names the step ("hash", "embed", "epoch 3", ...).
ProgressFn = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    """A progress callback that ignores every report."""
