"""CLI commands for fine-tuning: ``featx finetune`` and ``featx compare``.

Added to the ``featx`` group in featx.cli.main; each command parses options,
calls one library function (featx.finetune.finetune, featx.compare.compare)
and renders its progress and result.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from featx.backbones.features import DEFAULT_FEATURES
from featx.cli.options import (
    AutoOrFloat,
    Progress,
    device_option,
    emit,
    json_option,
    probe_options,
    quiet_option,
    store_option,
    weights_option,
)
from featx.recipes import RECIPE_HELP, RECIPES


def card_option(f):
    # not featx.cli.main.backbone_option: fine-tuning needs a card (architecture + torch weights),
    # not an ONNX file or a run directory
    return click.option("--backbone", "-b", default="efficientnet_lite0", show_default=True, metavar="NAME",
                        envvar="FEATX_BACKBONE",
                        help="Backbone card to fine-tune (see `featx models`).")(f)


class UnfreezeParam(click.ParamType):
    """A number of blocks (0 = linear probe) or ``all``."""

    name = "K|all"

    def convert(self, value, param, ctx):
        if value == "all" or isinstance(value, int):
            return value
        try:
            k = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number of blocks nor 'all'", param, ctx)
        if k < 0:
            self.fail(f"must be >= 0, got {k}", param, ctx)
        return k


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


class DurationParam(click.ParamType):
    """Seconds, written ``90``, ``90s``, ``30m``, ``1.5h``."""

    name = "DURATION"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip().lower()
        unit = _DURATION_UNITS.get(text[-1:])
        try:
            secs = float(text[:-1] if unit else text) * (unit or 1)
        except ValueError:
            self.fail(f"{value!r} is not a duration (e.g. 600, 90s, 30m, 1.5h)", param, ctx)
        if not secs > 0 or math.isinf(secs):
            self.fail(f"must be a positive duration, got {value!r}", param, ctx)
        return secs


#: the most epochs --time-budget may choose when --epochs is not given
BUDGET_MAX_EPOCHS = 100


class EpochProgress(Progress):
    """The shared progress bar, plus one line per finished epoch (loss, accuracy, images/s)."""

    def __init__(self, quiet: bool = False) -> None:
        super().__init__(enabled=False if quiet else None)
        self.lines = not quiet

    def epoch_done(self, row: dict) -> None:
        if not self.lines:
            return
        val = "" if math.isnan(row["val_acc"]) else f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
        line = (f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
                f"{val}  {row['images_per_second']:.1f} img/s"
                + ("  *best" if row.get("best_epoch") == row["epoch"] else ""))
        self._say(line)

    def plan_done(self, plan: dict) -> None:
        from featx.finetune.runlog import plural  # loaded already: plans come from a run

        if self.lines and "replanned_after_epoch" in plan:
            self._say(f"time budget, re-planned after epoch {plan['replanned_after_epoch']} from "
                      f"{plural(plan['timed_epochs'], 'whole epoch')}: about {plan['seconds_per_epoch']:.0f} s "
                      f"an epoch with validation, {plan['seconds_spent']:.0f} s spent: {plan['epochs']} epochs "
                      f"instead of {plan['epochs_before']}")
        elif self.lines and "first_plan" in plan:
            self._say(f"time budget, re-planned in epoch {plan['replanned_in_epoch']} from {plan['timed_steps']} "
                      f"steps: {plan['images_per_second']:.1f} training images/s, about "
                      f"{plan['seconds_per_epoch']:.0f} s an epoch with validation, {plan['seconds_before_training']:.0f} s "
                      f"spent: {plan['epochs']} epochs" + (f" (capped by --epochs; {plan['epochs_that_fit']} would fit)"
                                                           if plan["epochs_that_fit"] > plan["epochs"] else ""))
        elif self.lines:
            self._say(f"time budget {plan['time_budget_s']:.0f} s: {plan['images_per_second']:.1f} training "
                      f"images/s over the first {plan['timed_steps']} steps, about {plan['seconds_per_epoch']:.0f} s "
                      f"an epoch after {plan['seconds_before_training']:.0f} s of preparation: "
                      f"{plan['epochs']} epochs" + (f" (capped by --epochs; {plan['epochs_that_fit']} would fit)"
                                                    if plan["epochs_that_fit"] > plan["epochs"] else ""))

    def _say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            click.echo(line, err=True)


# the options saved in a run's config.json; with --resume only epochs may be given
_RUN_OPTIONS = ("train", "val", "backbone", "weights", "unfreeze", "epochs", "lr", "backbone_lr", "layer_decay",
                "batch_size", "weight_decay", "warmup_epochs", "label_smoothing", "class_weight", "patience",
                "val_fraction", "no_lp_init", "lp_C", "input_size", "crop_scale", "erase", "cutmix", "mixup", "ema",
                "bn_stats", "seed", "time_budget", "features", "recipe")


# training options finetune and compare share
erase_option = click.option(
    "--erase", type=click.FloatRange(0, 1), default=0.0, show_default=True, metavar="P",
    help="Chance that a training image also gets one box of random pixels (random erasing, 2-33% of its area).")
cutmix_option = click.option(
    "--cutmix", type=click.FloatRange(0, 1), default=0.0, show_default=True, metavar="P",
    help="Chance that a training batch gets CutMix: each image gets a box from another image of the "
         "batch, and the loss weighs both labels by area.")
mixup_option = click.option(
    "--mixup", type=click.FloatRange(0, 1), default=0.0, show_default=True, metavar="P",
    help="Chance that a training batch gets mixup instead: each image blended with another, both "
         "labels weighed by the blend. --cutmix + --mixup <= 1.")
layer_decay_option = click.option(
    "--layer-decay", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True, metavar="D",
    help="Layer-wise learning-rate decay: each trained block below the top gets D times the rate of the "
         "block above it (1: --backbone-lr for every block).")
ema_option = click.option(
    "--ema", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None, metavar="DECAY",
    help="Keep an exponential moving average of the weights (decay per step, e.g. 0.999); the average "
         "is validated, kept and exported.")


@click.command("finetune")
@click.argument("train", type=click.Path(exists=True, file_okay=False, path_type=Path), required=False)
@click.option("--val", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Validation folder (same classes). Default: a stratified --val-fraction of TRAIN.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory (default: runs/ftN, the first free N).")
@click.option("--resume", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Continue an interrupted run from its last completed epoch, with its saved "
                   "options and split; with a larger --epochs, extend a run (even a finished one).")
@card_option
@weights_option
@click.option("--recipe", type=click.Choice(sorted(RECIPES)), default=None,
              help="A measured set of options for one kind of data; options given on the command line "
                   "win. " + " ".join(f"{k}: {v}." for k, v in sorted(RECIPE_HELP.items())))
@click.option("--unfreeze", type=UnfreezeParam(), default=2, show_default=True,
              help="Top blocks of the card to train with the head: 0 = linear probe, all = everything.")
@click.option("--epochs", type=click.IntRange(1, 10000), default=10, show_default=True,
              help=f"Epochs to train; with --time-budget, the most it may choose (default then "
                   f"{BUDGET_MAX_EPOCHS}).")
@click.option("--time-budget", type=DurationParam(), default=None, metavar="DURATION",
              help="Wall time for the whole run (e.g. 30m, 1h, 600s): the epochs are chosen from the "
                   "measured speed of the first training steps, and the command says what it chose.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True,
              help="Peak learning rate of the new linear layer.")
@click.option("--backbone-lr", type=click.FloatRange(0), default=None,
              help="Peak learning rate of the unfrozen blocks (default: lr / 10).")
@layer_decay_option
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(0), default=0.05, show_default=True)
@click.option("--warmup-epochs", type=click.FloatRange(0), default=1.0, show_default=True)
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.1,
              show_default=True)
@click.option("--class-weight", type=click.Choice(["balanced", "none"]), default="balanced",
              show_default=True, help="Weight the loss so rare classes count as much as common ones.")
@click.option("--patience", type=click.IntRange(0), default=3, show_default=True,
              help="Stop after this many epochs without validation improvement (0: never).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1,
              show_default=True)
@click.option("--no-lp-init", is_flag=True,
              help="Start the linear layer at random instead of from a logistic-regression probe.")
@click.option("--lp-C", "lp_C", type=AutoOrFloat(), default="auto", show_default=True, metavar="auto|FLOAT",
              help="C of the LP probe (auto: cross-validated; a number skips the CV on big sets).")
@click.option("--input-size", type=click.IntRange(16, 1024), default=None,
              help="Override the card's input size. Smaller trains faster on CPU; on small images "
                   "(28 px Fashion-MNIST) 80 px beat 64 and 96 px in an hour (docs/finetune.md).")
@click.option("--features", type=click.Choice(["last", "multi"]), default=None,
              help="What the linear layer reads: the backbone's pooled output, or pooled intermediate "
                   "stages too (multi: LP-FT starts from the multi-layer probe of `fit-head`). "
                   f"Default: `featx extract`'s: {DEFAULT_FEATURES} for a card, last for timm:NAME.")
@click.option("--crop-scale", type=click.FloatRange(0, 1, min_open=True), default=0.08, show_default=True,
              help="Smallest area fraction of the random training crop (1 = flips only).")
@erase_option
@cutmix_option
@mixup_option
@ema_option
@click.option("--bn-stats/--no-bn-stats", default=None,
              help="Update BatchNorm statistics in the trained blocks (default: only from scratch; "
                   "batch statistics of small augmented batches undo the LP init).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--loader-workers", type=click.IntRange(0, 256), default=None,
              help="DataLoader processes that decode and augment training batches "
                   "(default: 0 on CPU, up to 8 on CUDA).")
@click.option("--workers", "old_workers", type=click.IntRange(0, 256), default=None, hidden=True,
              help="Deprecated name of --loader-workers.")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="With --resume: where the run's data folder is now, if it moved (its files must "
                   "still match the run's).")
@device_option
@store_option
@quiet_option(help="No progress bar or epoch lines.")
@json_option
def finetune_cmd(train, val, out, resume, backbone, weights, recipe, unfreeze, epochs, time_budget, lr, backbone_lr,
                 layer_decay, batch_size, weight_decay, warmup_epochs, label_smoothing, class_weight, patience,
                 val_fraction, no_lp_init, lp_C, input_size, features, crop_scale, erase, cutmix, mixup, ema,
                 bn_stats, seed, loader_workers, old_workers, root, device, store, quiet, as_json):
    """Fine-tune a backbone on TRAIN (ImageFolder layout) and export it back to ONNX.

    LP-FT: a logistic-regression head fitted on cached embeddings starts the new
    linear layer, then the top --unfreeze blocks train with it. The run directory
    works as a backbone (`featx extract DIR --backbone RUN`) and as a head
    (`featx predict RUN IMAGES`).
    """
    from featx.finetune import FinetuneInterrupted, finetune
    from featx.finetune.runlog import plural
    from featx.modelcard import command_line

    if resume is None and train is None:
        raise click.UsageError("give TRAIN (a folder of class folders), or --resume RUN_DIR")
    if resume is not None and out is not None and out.resolve() != resume.resolve():
        raise click.UsageError("--out and --resume name different directories; --resume continues "
                               "the run in place")
    if root is not None and resume is None:
        raise click.UsageError("--root finds the data of a run that moved; it goes with --resume RUN_DIR")
    if old_workers is not None:
        click.echo("warning: --workers is deprecated for finetune, where it sets DataLoader processes "
                   "(in extract and predict it means decoding threads); use --loader-workers", err=True)
        loader_workers = old_workers if loader_workers is None else loader_workers
    if resume is not None:
        options = _resume_options(click.get_current_context(), epochs)
    else:
        if time_budget is not None and click.get_current_context().get_parameter_source("epochs") in (
                None, ParameterSource.DEFAULT):
            epochs = BUDGET_MAX_EPOCHS
        options = dict(
            backbone=backbone, weights=weights, unfreeze=unfreeze, epochs=epochs, time_budget=time_budget,
            lr=lr, backbone_lr=backbone_lr, layer_decay=layer_decay, batch_size=batch_size, weight_decay=weight_decay,
            warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
            class_weight=None if class_weight == "none" else class_weight,
            patience=patience, val_fraction=val_fraction, lp_init=not no_lp_init, lp_C=lp_C,
            input_size=input_size, features=features, crop_scale=crop_scale, erase=erase,
            cutmix=cutmix, mixup=mixup, ema=ema, bn_stats=bn_stats, seed=seed)
        if recipe is not None:
            options = _with_recipe(click.get_current_context(), recipe, options, quiet)
    p = EpochProgress(quiet)
    try:
        r = finetune(train, val=val, out=out, resume=resume, root=root, device=device,
                     loader_workers=loader_workers, store=store, progress=p, on_epoch=p.epoch_done,
                     on_plan=p.plan_done,
                     command=command_line(sys.argv[1:]), **options)
    except FinetuneInterrupted as e:
        p.close()
        click.echo(f"\ninterrupted: {e.run_dir} holds {plural(e.epoch, 'completed epoch')}; continue with: "
                   f"featx finetune --resume {e.run_dir}", err=True)
        sys.exit(130)
    finally:
        p.close()
    emit(r.summary.to_dict(), as_json, _finetune_lines(r.summary, device))


def run_line(stage: str, elapsed: int, total: int) -> str:
    """compare's whole-run report ("runs 3/9", seconds elapsed, elapsed + ETA) as a line."""
    from featx.progress import eta_text

    k, n = stage.rsplit(" ", 1)[-1].split("/")
    left = f"about {eta_text(total - elapsed)} left" if total else "time left unknown until a run is timed"
    return f"compare: {k} of {n} runs done, {eta_text(elapsed)} elapsed, {left}"


def with_run_lines(bar: Progress, quiet: bool):
    """The progress callback of ``featx compare``: the bar draws each run's stages; the whole
    compare (``runs k/n``) is a line of its own after every run, above the bar."""
    def report(stage: str, done: int, total: int) -> None:
        if not stage.startswith("runs "):
            bar(stage, done, total)
        elif not quiet:
            from tqdm import tqdm

            tqdm.write(run_line(stage, done, total), file=sys.stderr)
    return report


def _with_recipe(ctx: click.Context, recipe: str, options: dict, quiet: bool) -> dict:
    """``options`` less the defaults the recipe replaces; says which values the recipe set."""
    given = {n for n in options if ctx.get_parameter_source(n) not in (None, ParameterSource.DEFAULT)}
    applied = {k: v for k, v in RECIPES[recipe].items() if k not in given}
    if not quiet:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in applied.items())
        click.echo(f"recipe {recipe}: {flags or 'nothing (every option it sets was given)'}", err=True)
    return {**{k: v for k, v in options.items() if k not in applied}, "recipe": recipe}


def _resume_options(ctx: click.Context, epochs: int) -> dict:
    """With --resume only --epochs may be given (to extend the run); any other run option is refused."""
    given = [n for n in _RUN_OPTIONS if ctx.get_parameter_source(n) not in (None, ParameterSource.DEFAULT)]
    if set(given) - {"epochs"}:
        flags = ", ".join("--" + n.replace("_", "-") for n in given if n != "epochs")
        raise click.UsageError(f"--resume continues a run with its saved options; {flags} cannot "
                               "change (only --epochs can, to extend the run)")
    return {"epochs": epochs} if "epochs" in given else {}


#: how many skipped files the terminal shows (summary.json lists them all)
SHOW_SKIPPED = 5


def _finetune_lines(s, device: str) -> list[str]:
    from featx.finetune.runlog import plural

    best = s["best_val_acc"]
    lines = [
        f"device: {s['device']} (asked: {device})",
        f"{plural(s['epochs_trained'], 'epoch')} on {plural(s['train_images'], 'image')}, "
        f"{plural(len(s['classes']), 'class', 'classes')}"
        + (" (stopped early)" if s["stopped_early"] else "")
        + (f"; best epoch {s['best_epoch']}, val accuracy {best:.4f}"
           if best is not None and not math.isnan(best) else ""),
        f"validation: {plural(s['val_images'], 'image')} ({s['val_source']})",
    ]
    if s["probe_val_acc"] is not None:
        lines.append(f"linear probe (LP init, before any step): val accuracy {s['probe_val_acc']:.4f}")
    if s["kept_last"]:
        k = s["kept_last"]
        lines.append(f"kept the last epoch: the top epoch {k['top_epoch']} (val accuracy {k['top_val_acc']:.4f}) "
                     f"beats it by less than the noise of {plural(s['epochs_trained'], 'epoch')} on "
                     f"{plural(s['val_images'], 'validation image')} ({k['threshold']:.4f}: the standard error "
                     f"{k['standard_error']:.4f} times sqrt(2 ln {s['epochs_trained']}))")
    if s["plan"]:
        lines.append(f"time budget {s['plan']['time_budget_s']:.0f} s: chose {plural(s['plan']['epochs'], 'epoch')} "
                     f"({s['plan']['seconds_per_epoch']:.0f} s each at the measured speed)")
    if s["kept_probe"]:
        lines.append("fine-tuning did not beat the linear probe on the validation split: the run "
                     "exports the probe (best epoch 0) rather than a worse model")
    skipped = s["skipped"]
    if skipped:
        lines.append(f"skipped {plural(len(skipped), 'unreadable file')} (all listed in "
                     f"{s['run_dir']}/summary.json):")
        lines += [f"  {d['path']}: {d['reason']}" for d in skipped[:SHOW_SKIPPED]]
        if len(skipped) > SHOW_SKIPPED:
            lines.append(f"  ... and {len(skipped) - SHOW_SKIPPED} more")
    lines += [
        f"run: {s['run_dir']}  ({s['seconds']} s)",
        f"backbone: {s['run_dir']}/backbone (fingerprint {s['fingerprint']})",
        f"head: {s['head']}   curve: {s['run_dir']}/curve.png",
        f"next: featx predict {s['run_dir']} IMAGES   |   featx extract DIR --backbone {s['run_dir']}",
    ]
    return lines


@click.command("compare")
@click.argument("train", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--test", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Test folder (same classes). Default: a stratified 20% of TRAIN.")
@click.option("--per-class", default="5,20,100,all", show_default=True, metavar="N,N,...|all",
              help="Training images per class to measure at.")
@click.option("--methods", default="frozen,lpft,scratch", show_default=True,
              help="Any of frozen, lpft, scratch.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("report"),
              show_default=True)
@card_option
@click.option("--epochs", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="Epochs for LP-FT and scratch (the same budget for both).")
@click.option("--unfreeze", type=UnfreezeParam(), default=2, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True)
@click.option("--backbone-lr", type=click.FloatRange(0), default=None,
              help="LP-FT's learning rate for the unfrozen blocks (default: lr / 10; scratch uses lr).")
@layer_decay_option
@click.option("--crop-scale", type=click.FloatRange(0, 1, min_open=True), default=0.08, show_default=True,
              help="Smallest area fraction of the random training crop.")
@erase_option
@cutmix_option
@mixup_option
@ema_option
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--input-size", type=click.IntRange(16, 1024), default=None,
              help="Override the card's input size for every method (faster on CPU).")
@click.option("--test-per-class", type=click.IntRange(1), default=None,
              help="Cap the test images per class (faster).")
@click.option("--seed", type=int, default=0, show_default=True)
@probe_options
@device_option
@store_option
@quiet_option(help="No progress bar or epoch lines.")
@json_option
@click.pass_context
def compare_cmd(ctx, train, test, per_class, methods, out, backbone, epochs, unfreeze, lr, backbone_lr, layer_decay,
                crop_scale, erase, cutmix, mixup, ema, batch_size, input_size, test_per_class, seed, backbones,
                features, crops, device, store, quiet, as_json):
    """Accuracy and wall time vs images per class: frozen + logreg, LP-FT, scratch.

    With --backbones/--features/--crops: first which frozen features to use, each
    combination scored by CV on TRAIN (features.md); alone, that is all it runs.
    """
    from featx.compare import compare, parse_per_class

    parse_per_class(per_class)  # bad values fail before any work
    probes = any(v is not None for v in (backbones, features, crops))
    if probes and ctx.get_parameter_source("methods") == ParameterSource.DEFAULT:
        methods = ""  # comparing features alone; --methods adds the learning curve
    p = Progress(enabled=False if quiet else None)
    try:
        r = compare(train, test, out=out, per_class=per_class, backbones=backbones, features=features,
                    crops=crops, methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                    backbone=backbone, epochs=epochs, unfreeze=unfreeze,
                    lr=lr, backbone_lr=backbone_lr, layer_decay=layer_decay, crop_scale=crop_scale, erase=erase,
                    cutmix=cutmix, mixup=mixup, ema=ema, batch_size=batch_size, input_size=input_size,
                    test_per_class=test_per_class, seed=seed, device=device, store=store,
                    progress=with_run_lines(p, quiet))
    finally:
        p.close()
    lines = [(out / "features.md").read_text().split("\n\n![")[0], ""] if probes else []
    if methods:
        lines.append((out / "compare.md").read_text().split("\n\n![")[0])
    lines += ["", f"table: {r.files['markdown']}  json: {r.files['json']}  plot: {r.files['png']}"]
    emit({"config": r.config, "rows": r.rows, "notes": r.notes, "files": r.files}, as_json, lines)
