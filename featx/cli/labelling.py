"""CLI commands for the labelling loop: featx suggest (what to label next) and featx sufficiency
(how many images each class still needs)."""

from __future__ import annotations

from pathlib import Path

import click

from featx.cli.options import (
    batch_options,
    device_option,
    emit,
    json_option,
    progress_bar,
    quiet_option,
    store_option,
)


@click.command("suggest")
@click.argument("pool", metavar="POOL", type=click.Path(exists=True, path_type=Path))
@click.option("--labelled", "-l", "labelled", required=True, type=click.Path(exists=True, path_type=Path),
              metavar="TABLE", help="featx table of the images labelled so far (from `featx extract`).")
@click.option("-n", "n", type=click.IntRange(1), required=True, help="How many images to suggest.")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=Path("next.csv"),
              show_default=True, help="CSV (or .tsv) of the suggestions; to_label/ is made beside it.")
@click.option("--strategy", type=click.Choice(["margin", "entropy", "margin+diversity", "margin+coreset",
                                               "random"]),
              default="margin", show_default=True,
              help="margin: least gap between the top two classes; entropy; margin+diversity: "
                   "k-means over the least-margin candidates, so the N are not near copies; "
                   "margin+coreset: greedy k-centre over them; random: the baseline.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the head's CV, k-means and random.")
@click.option("--head", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              metavar="HEAD", help="Score the pool with this head of TABLE (from `featx fit-head`) instead "
                                   "of fitting one here: skips the seconds of cross-validation.")
@click.option("--layout", type=click.Choice(["copy", "link", "none"]), default="copy", show_default=True,
              help="to_label/: copies (same bytes, so extract finds them cached), symbolic links, or none.")
@click.option("--backbone", "-b", default=None, metavar="NAME|DIR|FILE.onnx",
              help="Backbone of the labelled table when its recorded export is gone.")
@store_option
@device_option
@batch_options
@quiet_option
@json_option
def suggest_cmd(pool: Path, labelled: Path, n: int, out: Path, strategy: str, seed: int, head, layout: str,
                backbone, store, device: str, batch_size: int, workers, quiet: bool, as_json: bool) -> None:
    """Choose the N images of POOL (a folder, listing or featx table) to label next.

    A head fitted on TABLE scores the pool; images whose content is in TABLE already are
    never suggested. Writes OUT (with an empty label column and the reason for each image)
    and to_label/ beside it: sort its images into its class folders, move them into your
    training folder, `featx extract` it again (cached) and `featx fit-head`.
    """
    from featx.suggest import check_destination, suggest, write_suggestions

    check_destination(out, layout)  # before the work: a full to_label/ is refused up front
    with progress_bar(quiet or as_json) as p:
        r = suggest(pool, labelled, n, strategy=strategy, seed=seed, head=head, backbone=backbone, store=store,
                    device=device, batch_size=batch_size, workers=workers, progress=p)
        write_suggestions(r, out, layout=layout)
    s = r.seconds
    lines = [f"{len(r.rows)} of {r.pool_size} pool images to label ({r.strategy}, seed {r.seed}); "
             f"{r.already_labelled} already labelled, {r.repeats} repeats skipped",
             f"  {'head file' if head else 'head fitted'} on {r.labelled} labelled images (C={r.head['C']}); "
             f"pool {s['pool']:.1f} s, "
             f"head + choice {s['fit+choose']:.1f} s",
             *[f"  {row['rank']:>3}. {row['path']}  {row['reason']}" for row in r.rows[:5]],
             *(["  ..."] if len(r.rows) > 5 else []),
             f"csv:      {r.csv}"]
    if r.to_label:
        lines.append(f"to_label: {r.to_label}  (sort into its class folders, then move into your data)")
    if r.failures:
        lines.append(f"  {len(r.failures)} pool files skipped (unreadable): first {r.failures[0][0]}: "
                     f"{r.failures[0][1]}")
    emit(r.summary(), as_json, lines)


@click.command("sufficiency")
@click.argument("table", metavar="TABLE", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("sufficiency"), show_default=True,
              help="Folder for sufficiency.png, .csv and .json.")
@click.option("--test", type=click.Path(exists=True, path_type=Path), default=None, metavar="TABLE",
              help="Labelled table of held-out images to measure recall on (default: hold out "
                   "--holdout of each class of TABLE).")
@click.option("--target", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.9,
              show_default=True, help="Recall each class should reach.")
@click.option("--seeds", type=click.IntRange(1), default=3, show_default=True,
              help="Nested-subset draws per size.")
@click.option("--max-per-class", type=click.IntRange(1), default=None,
              help="Largest subset (default: the smallest class's training images).")
@click.option("--sizes", default=None, metavar="N,N,...",
              help="Images per class of each point (default: 8 on a log scale).")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.3,
              show_default=True, help="Share of each class held out when there is no --test.")
@quiet_option
@json_option
def sufficiency_cmd(table: Path, out_dir: Path, test, target: float, seeds: int, max_per_class,
                    sizes, holdout: float, quiet: bool, as_json: bool) -> None:
    """Per-class learning curves of TABLE, a power law fitted to each, and how many images
    each class needs for --target recall (or gains from doubling)."""
    from featx.sufficiency import sufficiency, write_sufficiency

    try:
        size_list = [int(v) for v in sizes.split(",")] if sizes else None
    except ValueError:
        raise click.BadParameter(f"{sizes!r} is not a comma-separated list of integers",
                                 param_hint="--sizes") from None
    with progress_bar(quiet or as_json) as p:
        r = sufficiency(table, test=test, target=target, sizes=size_list, max_per_class=max_per_class,
                        seeds=seeds, holdout=holdout, progress=p)
        write_sufficiency(r, out_dir)
    lines = [f"learning curves of {len(r.classes)} classes at {r.sizes} images a class, {r.seeds} seeds, "
             f"recall on {r.evaluated_on} ({r.seconds:.1f} s)",
             f"  {'class':<16} {'images':>6} {'recall':>7} {'if x2':>13} {'for ' + format(r.target, '.0%'):>9}"
             "  flags"]
    for c in r.classes:
        need = "-" if c.needed is None else str(c.needed)
        lines.append(f"  {c.label[:16]:<16} {c.images:>6} {c.recall_now:>7.1%} "
                     f"{c.recall_doubled:>6.1%} ±{(c.doubled_high - c.doubled_low) / 2:>5.1%} {need:>9}  "
                     f"{' '.join(c.flags)}")
    lines += [f"png:  {r.files['png']}", f"csv:  {r.files['csv']}", f"json: {r.files['json']}"]
    emit(r.to_dict(), as_json, lines)
