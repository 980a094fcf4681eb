"""What every featx command shares: option decorators, the progress bar, the summary printer."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

import click


def backbone_option(f):
    return click.option(
        "--backbone", "-b", default=None, metavar="NAME|timm:NAME|DIR|FILE.onnx", envvar="FEATX_BACKBONE",
        help="Backbone card name (see `featx models`), timm:NAME for any timm model (`featx models "
             "--timm`), an export or fine-tuning run directory, or your own ONNX file. "
             "Default: efficientnet_lite0.")(f)


def weights_option(f):
    return click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
                        help="Local checkpoint (.pth or .safetensors state dict) instead of the published "
                             "weights: how to use a card or timm:NAME without internet. A fine-tune run's best.pt "
                             "works too: its trained backbone, e.g. to go on at a larger --input-size.")(f)


def features_option(f):
    return click.option(
        "--features", type=click.Choice(["last", "multi"]), default=None,
        help="Embedding of a backbone card: multi (every stage pooled and concatenated; extract's "
             "default: it beat last on every data set measured, and fit-head can still use only its "
             "last segment) or last (the last layer's average: 4x narrower). See docs/heads.md.")(f)


def crop_option(f):
    return click.option(
        "--crop", type=click.Choice(["center", "none"]), default=None,
        help="Preprocessing of a backbone card: center (the card's resize + centre crop; default) or "
             "none (resize the whole image to the input size: nothing is cut off).")(f)


def probe_options(f):
    f = click.option("--crops", default=None, metavar="center,none",
                     help="Crops to compare as frozen probes (see --features).")(f)
    f = click.option("--features", default=None, metavar="last,multi",
                     help="Feature recipes to compare as frozen probes, each scored by CV on TRAIN "
                          "(report: features.md). Default: extract's (multi).")(f)
    return click.option("--backbones", default=None, metavar="A,B,...",
                         help="Backbone cards to compare as frozen probes (see --features).")(f)


def device_option(f):
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                        envvar="FEATX_DEVICE", show_default=True,
                        help="auto uses CUDA when ONNX Runtime has it; an explicit cuda that cannot "
                             "be honoured is an error.")(f)


def store_option(f):
    return click.option("--store", type=click.Path(file_okay=False), default=None, envvar="FEATX_STORE",
                        help="Embedding cache directory (default: $FEATX_HOME/store).")(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")(f)


def batch_options(f):
    f = click.option("--workers", type=click.IntRange(1, 256), default=None,
                     help="Decoding threads (default: number of CPU cores).")(f)
    return click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True)(f)


_LAST_STAGE: list[str | None] = [None]


def last_stage() -> str | None:
    """The last progress stage any command of this process reported (for the Ctrl-C message)."""
    return _LAST_STAGE[0]


def _stage_name(stage: str) -> str:
    """A stage's name without its place: "[3/9] epoch 2/5" -> "epoch", "choose C" -> "choose C"."""
    name = stage.split("] ", 1)[-1]
    words = name.split(" ")
    if len(words) > 1 and words[-1].replace("/", "").isdigit():
        name = " ".join(words[:-1])
    return name


class Progress:
    """Renders the library's progress callback: a bar on a terminal, nothing otherwise."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None
        self.stage = None
        self.passes = 0  # how many times the current stage started over (epochs)

    def __call__(self, stage: str, done: int, total: int) -> None:
        _LAST_STAGE[0] = stage
        if not self.enabled:
            return
        from tqdm import tqdm

        # a stage may carry a prefix ("[3/9] epoch 2/5"): the unit goes by its name
        kind = _stage_name(stage)
        if stage != self.stage:
            self.close()
            self.stage, self.passes = stage, 1
            if total:
                unit = {"epoch": "batch", "choose C": "fit", "fit": "fit"}.get(kind, "img")
                self.bar = tqdm(total=total, desc=self._desc(), unit=unit, dynamic_ncols=True,
                                file=sys.stderr)
            elif kind == "backbone" or stage.endswith("] backbone") or stage.startswith("backbone"):
                # no count to show, but the first use exports the backbone (a minute or more):
                # say so, with the time it has taken, instead of sitting silent
                self.bar = tqdm(total=None, desc="backbone (exported to ONNX on first use)",
                                bar_format="{desc}: {elapsed}", file=sys.stderr)
        elif self.bar is not None and done < self.bar.n:
            # the same stage again (the next epoch): a fresh bar, so its rate and ETA are this
            # pass's, not an average over every pass since the first
            self.passes += 1
            self.bar.reset(total=total)
            self.bar.set_description(self._desc(), refresh=False)
        if self.bar is not None and total:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()

    def _desc(self) -> str:
        """The bar's label: the stage, and for epochs which one ("epoch 3") where the stage
        does not say (the library names it: "epoch 3/10")."""
        if self.stage is not None and self.stage.endswith("epoch"):
            return f"{self.stage} {self.passes}"
        return self.stage or ""

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextmanager
def progress_bar(quiet: bool = False):
    _LAST_STAGE[0] = None
    p = Progress(enabled=False if quiet else None)
    try:
        yield p
    finally:
        p.close()


def emit(summary: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(summary))
    else:
        for line in lines:
            # a file name that is not UTF-8 prints with \xNN escapes instead of failing on a strict terminal
            click.echo(os.fsencode(line).decode("utf-8", "backslashreplace"))


def tta_option(f):
    return click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
                        help="Test-time augmentation: flip averages the probabilities of each image and "
                             "its mirror image (one more embedding per image, not cached).")(f)


def quiet_option(f=None, *, help: str = "No progress bar."):
    """``--quiet/-q``; ``@quiet_option`` or ``@quiet_option(help=...)`` where it silences more."""
    def add(g):
        return click.option("--quiet", "-q", is_flag=True, help=help)(g)
    return add if f is None else add(f)


class AutoOrFloat(click.ParamType):
    """``auto`` or a positive number (``--C``, ``--lp-C``): the one type for such options."""

    name = "auto|FLOAT"

    def convert(self, value, param, ctx):
        if isinstance(value, float) or value == "auto":
            return value
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither 'auto' nor a number", param, ctx)
        if not v > 0:
            self.fail(f"must be > 0, got {value}", param, ctx)
        return v
