"""``featx audit``: label issues, near duplicates and leakage, outliers, and a relabel page (featx.audit)."""

from __future__ import annotations

from pathlib import Path

import click

from featx.cli.options import (
    device_option,
    emit,
    json_option,
    progress_bar,
    quiet_option,
    store_option,
)


@click.command("audit")
@click.argument("table", type=click.Path(exists=True, path_type=Path))
@click.option("--test", type=click.Path(exists=True, path_type=Path), default=None, metavar="TABLE2",
              help="A table of the same backbone (e.g. the test set): its images with a near copy in "
                   "TABLE are listed (leakage).")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for label_issues.csv, duplicates.csv, outliers.csv, audit.html, audit.json.")
@click.option("--threshold", type=click.FloatRange(-1.0, 1.0), default=None,
              help="Near-duplicate cosine threshold. Default: calibrated on TABLE's own images "
                   "(altered copies must be found, distinct images must not be).")
@click.option("--per-image", type=click.IntRange(1), default=20, show_default=True,
              help="Most near copies listed per image.")
@click.option("--cv", type=click.IntRange(2, 20), default=None,
              help="Folds of the out-of-fold probabilities. Default: 5, or 3 from 6,000 rows on.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--relabel", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              metavar="RELABEL.csv",
              help="Apply these corrections (path,action,label) to TABLE first, as fit-head "
                   "--relabel does: audit the corrected table.")
@click.option("--backbone", "-b", default=None, metavar="NAME|DIR|FILE.onnx",
              help="The backbone that made TABLE, when its recorded export is gone (embeds the "
                   "calibration's altered copies); one with another fingerprint is refused.")
@store_option
@device_option
@quiet_option
@json_option
def audit_cmd(table, test, out_dir, threshold, per_image, cv, seed, relabel, backbone, store, device,
              quiet, as_json) -> None:
    """Find wrong labels, near duplicates (and TABLE2 leakage) and outliers in TABLE.

    Writes the findings and audit.html into --out; in the page, pick a label or drop
    per image and download relabel.csv for `featx fit-head --relabel`.
    """
    from featx.audit import audit

    with progress_bar(quiet or as_json) as p:
        r = audit(table, test, out_dir, threshold=threshold, per_image=per_image, cv=cv, seed=seed,
                  backbone=backbone, store=store, device=device, relabel=relabel, progress=p)
    s = r.summary
    th = s["threshold"]
    cal = th["calibration"]
    oof = s["oof"]
    fixes = s["relabel"]
    lines = [f"{s['rows']} images, {len(s['classes'])} classes in {table}"
             + (f" after {relabel}: {fixes['relabelled']} relabelled, {fixes['dropped']} dropped" if fixes else ""),
             f"label issues: {s['label_issues']} flagged by cleanlab (out-of-fold probabilities: "
             f"{oof['folds']}-fold logistic regression, C = {oof['C']:g}, accuracy {oof['oof_accuracy']:.4f}; "
             f"averaged with the nearest images' vote)",
             f"near-duplicate threshold: cosine {th['value']:.4f}: {th['why']}"]
    if cal:
        lines.append(f"  measured: {cal['recall']:.1%} of {cal['copies']} altered copies found, "
                     f"{cal['false_rate']:.2%} of {cal['distinct_images']} distinct images paired"
                     + ("" if cal["targets_met"] else " (targets: >= 95% found, <= 0.1% paired: not met)"))
    lines.append(f"near duplicates: {s['duplicate_pairs']} pair(s) in {s['duplicate_clusters']} cluster(s)")
    if test is not None:
        lines.append(f"leakage: {s['leaked']} of {s['test_rows']} images of {test} have a near copy in "
                     f"{table}; {s['leaked_other_label']} of them with another label")
    lines.append(f"outliers: {s['outliers']} flagged (far from their nearest neighbours)")
    lines.append(f"took {s['seconds']['total']:.1f} s; wrote " + ", ".join(f.name for f in r.files)
                 + f" in {r.out_dir}")
    lines.append(f"next: open {r.out_dir / 'audit.html'}, pick corrections, download relabel.csv, then "
                 f"`featx fit-head --embeddings {table} --relabel relabel.csv`")
    emit({**s, "out_dir": str(r.out_dir), "files": [str(f) for f in r.files]}, as_json, lines)
