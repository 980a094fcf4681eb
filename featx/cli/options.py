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
                             "weights: how to use a card or timm:NAME without internet.")(f)


def features_option(f):
    return click.option(
        "--features", type=click.Choice(["last", "multi"]), default=None,
        help="Embedding of a backbone card: last (the last layer's average; default) or multi (every "
             "stage pooled and concatenated: wider, better on data unlike ImageNet). See docs/heads.md.")(f)


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
                          "(report: features.md).")(f)
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


class Progress:
    """Renders the library's progress callback: a bar on a terminal, nothing otherwise."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            if total:
                unit = {"epoch": "batch", "choose C": "fit", "fit": "fit"}.get(stage, "img")
                self.bar = tqdm(total=total, desc=stage, unit=unit, dynamic_ncols=True, file=sys.stderr)
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextmanager
def progress_bar(quiet: bool = False):
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


def quiet_option(f):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bar.")(f)
