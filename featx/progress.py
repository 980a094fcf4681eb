"""How library code reports progress: a callback the caller renders (the CLI draws a bar).

Library code never prints. A long job calls ``progress(stage, done, total)``
as it goes; ``no_progress`` is the default when nobody is watching.
``LogProgress`` renders the callback as log lines (the estimators' ``verbose=``),
and ``Watch`` remembers the last report, so an interrupted job can say how far it got.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["LogProgress", "ProgressFn", "Watch", "eta_text", "no_progress"]

#: ``progress(stage, done, total)``: ``stage`` names the step ("hash", "embed", "epoch 3", ...).
ProgressFn = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    """A progress callback that ignores every report."""


def eta_text(seconds: float) -> str:
    """A duration for people: ``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class LogProgress:
    """A progress callback that logs at INFO: ``"embed 96/300 (32%), 25.1/s, ETA 8 s"``.

    A line when a stage starts and when it completes, and in between at most one every
    ``every`` seconds (0: every report). Rate and ETA are the stage's own.
    """

    def __init__(self, logger: logging.Logger, every: float = 10.0, prefix: str = "") -> None:
        self.logger, self.every, self.prefix = logger, every, prefix
        self.stage: str | None = None
        self.start = self.last = 0.0
        self.first_done = 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        new = stage != self.stage
        if new:
            self.stage, self.start, self.first_done = stage, now, done
        elif not (done >= total > 0) and now - self.last < self.every:
            return
        self.last = now
        self.logger.info("%s%s", self.prefix, self.line(stage, done, total, now))

    def line(self, stage: str, done: int, total: int, now: float) -> str:
        if not total:
            return f"{stage}: {eta_text(now - self.start)}"
        text = f"{stage} {done}/{total} ({100 * done / total:.0f}%)"
        elapsed, moved = now - self.start, done - self.first_done
        if elapsed > 0 and moved > 0:
            rate = moved / elapsed
            text += f", {rate:.3g}/s"
            if done < total:
                text += f", ETA {eta_text((total - done) / rate)}"
        return text


class Watch:
    """A progress callback that passes reports on to ``inner`` and remembers the last one."""

    def __init__(self, inner: ProgressFn = no_progress) -> None:
        self.inner = inner
        self.last: tuple[str, int, int] | None = None
        self.seen: dict[str, tuple[int, int]] = {}  # stage -> its last (done, total)

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.last = (stage, done, total)
        self.seen[stage] = (done, total)
        self.inner(stage, done, total)
