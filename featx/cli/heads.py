"""CLI commands for heads: fit-head, predict, evaluate, export-classifier.

Added to the ``featx`` group in featx.cli.main; each command parses options,
calls one library function and renders its result.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from featx.cli.options import (
    AutoOrFloat,
    batch_options,
    device_option,
    emit,
    json_option,
    progress_bar,
    quiet_option,
    store_option,
    tta_option,
)
from featx.errors import FeatXError
from featx.heads.kinds import HEAD_KINDS


def head_argument(f):
    return click.argument("head", metavar="HEAD", type=click.Path(exists=True, path_type=Path))(f)


def recorded_backbone_option(what: str):
    """--backbone for commands whose backbone is recorded (no env var: it must match)."""
    return click.option(
        "--backbone", "-b", default=None, metavar="NAME|DIR|FILE.onnx",
        help=f"Backbone (card name, export or run directory, ONNX file). Default: the one "
             f"recorded in the {what}; one with another fingerprint is refused.")


def _failure_lines(failures: list[tuple[str, str]], report: str | None = None) -> list[str]:
    lines = [f"  skipped {p}: {why}" for p, why in failures[:5]]
    if len(failures) > 5:
        lines.append(f"  ... {len(failures) - 5} more" + (f" (see {report})" if report else ""))
    return lines


@click.command("fit-head")
@click.option("--embeddings", "-e", type=click.Path(exists=True, path_type=Path), default=None,
              help="Embeddings table from `featx extract` (default: the one *.featx.parquet "
                   "in the current folder).")
@click.option("--head", "head_kind", type=click.Choice(HEAD_KINDS),
              default="logreg", show_default=True,
              help="Classifier on the scaled embeddings; sgd-logreg streams the table shard by "
                   "shard (for tables larger than memory; --C is ignored, alpha is chosen on a "
                   "held-out split).")
@click.option("--C", "C", type=AutoOrFloat(), default="auto", show_default=True, metavar="auto|FLOAT",
              help="Inverse regularisation; auto picks it by stratified CV over the head's log grid "
                   "(logreg: by out-of-fold log-loss, then calibrates the probabilities with a "
                   "temperature fitted on the same out-of-fold predictions).")
@click.option("--class-weight", type=click.Choice(["none", "balanced"]), default="none",
              show_default=True, help="balanced reweights classes by inverse frequency.")
@click.option("--cv", type=click.IntRange(2, 20), default=None,
              help="Cross-validation folds for --C auto. Default: 5, or 3 from 6,000 CV rows on.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--segment", type=click.Choice(["auto", "all", "last"]), default="auto", show_default=True,
              help="On a multi table (extract's default): the columns a logreg head uses, the whole "
                   "vector or its last segment (the backbone's own pooled output); auto scores both "
                   "by the same CV as --C auto and keeps the better.")
@click.option("--out", "-o", type=click.Path(dir_okay=True, path_type=Path), default=None,
              help="Head file to write (or a directory for DIR/head.featx). Default: ./head.featx")
@click.option("--force", is_flag=True,
              help="Replace --out even if it holds a head of another table (or another file).")
@click.option("--relabel", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              metavar="RELABEL.csv",
              help="Corrections to apply before fitting: a CSV with columns path,action,label "
                   "(action relabel or drop), e.g. the relabel.csv that `featx audit`'s page "
                   "downloads. The report and model card record what changed.")
@recorded_backbone_option("embeddings table")
@quiet_option
@json_option
def fit_head_cmd(embeddings, head_kind, C, class_weight, cv, seed, segment, out, force, relabel,
                 backbone, quiet, as_json):
    """Fit a classifier head on cached embeddings; writes the head file and a report."""
    from featx.fit_table import find_table, fit_table
    from featx.modelcard import command_line

    table = embeddings or find_table()
    if not as_json:
        click.echo(f"table: {table.resolve()}")
    with progress_bar(quiet) as p:
        r = fit_table(table, head=head_kind, C=C, class_weight=None if class_weight == "none"
                      else class_weight, cv=cv, seed=seed, out=out, backbone=backbone, force=force,
                      command=command_line(sys.argv[1:]), segment=segment, relabel=relabel,
                      progress=p)
    for w in r.warnings:
        click.echo(f"warning: {w}", err=True)
    rep = r.report
    summary = {**{k: v for k, v in rep.items() if k not in ("cv_grid", "curve")},
               "head_file": str(r.head_file), "report": str(r.report_file), "replaced": r.replaced,
               "card": str(r.card_file) if r.card_file else None, "warnings": r.warnings}
    summary.pop("relabel", None)
    if rep.get("relabel"):
        summary["relabel"] = {k: rep["relabel"][k] for k in ("file", "relabelled", "dropped")}
    lines = _streaming_lines(rep) if head_kind == "sgd-logreg" else _fit_lines(rep)
    if rep.get("relabel"):
        fixes = rep["relabel"]
        lines.insert(0, f"corrections from {relabel}: {fixes['relabelled']} relabelled, "
                        f"{fixes['dropped']} dropped")
    lines += [f"wrote head: {r.head_file}" + (" (replaced this table's previous head)"
                                              if r.replaced else ""),
              f"wrote report: {r.report_file}"]
    lines += [f"wrote model card: {r.card_file}"] if r.card_file else []
    emit(summary, as_json, lines)


def _fit_lines(rep: dict) -> list[str]:
    lines = [f"{rep['head']} on {rep['n_train']} images x {rep['dim']}, {len(rep['classes'])} classes"]
    if rep["C_auto"]:
        by = (f", chosen by log-loss {rep['cv_log_loss']:.4f} +- {rep['cv_log_loss_std']:.4f}"
              if rep.get("cv_select") == "log_loss" and "cv_log_loss" in rep else "")
        lines.append(f"C = {rep['C']:g} (auto: {rep['cv_folds']}-fold CV on {rep['cv_rows']} rows, "
                     f"{rep['cv_metric']} {rep['cv_score_mean']:.4f} +- {rep['cv_score_std']:.4f}{by})")
    else:
        lines.append(f"C = {rep['C']:g}")
    if rep.get("segment"):
        cvs = rep.get("segment_cv")
        scored = f" (CV: all {cvs['all']:.4f}, last {cvs['last']:.4f})" if cvs else ""
        lines.append(f"columns: {'the last segment' if rep['segment'] == 'last' else 'the whole multi vector'}"
                     f"{scored}")
    cal = rep.get("calibration") or {}
    if cal.get("method") == "temperature":
        lines.append(f"calibration: temperature {cal['temperature']:.3f} (out-of-fold log-loss "
                     f"{cal['oof_log_loss_before']:.4f} -> {cal['oof_log_loss_after']:.4f})")
    elif cal.get("method") == "none":
        lines.append("calibration: none (a fixed C runs no cross-validation; --C auto calibrates)")
    nov = rep.get("novelty")
    if nov:
        lines.append(f"unknown images: cosine distance to the nearest of {nov['sample_rows']} training "
                     f"rows above {nov['threshold']:.4f} (the {nov['quantile']:g} quantile of the "
                     "training rows' own)")
    if not rep["converged"]:
        lines.append("warning: the solver did not fully converge; try a smaller C")
    return [*lines, f"training accuracy {rep['train_accuracy']:.4f} ({rep['seconds']} s)"]


def _streaming_lines(rep: dict) -> list[str]:
    val = f"{rep['val_accuracy']:.4f}" if rep["val_accuracy"] is not None else "n/a"
    return [f"sgd-logreg on {rep['rows']} images x {rep['dim']}, {len(rep['classes'])} classes, "
            f"streamed (at most {rep['max_rows_in_memory']} rows in memory)",
            f"alpha = {rep['alpha']:g} (held-out accuracy {val}, {rep['epochs']} epochs, "
            f"{rep['seconds']:.1f} s)"]


@click.command("predict")
@head_argument
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write predictions to .csv, .tsv or .json.")
@click.option("--top-k", type=click.IntRange(1, 1000), default=3, show_default=True)
@click.option("--min-proba", type=click.FloatRange(0.0, 1.0), default=None, metavar="P",
              help="Abstain below this top probability: the label is left empty (CSV), null "
                   "(JSON), '?' here; the probabilities are still written.")
@click.option("--unknown-quantile", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              metavar="Q", help="Flag an image as unknown (label left empty, unknown=true) when "
              "its distance to the head's training embeddings exceeds this quantile of the training "
              "rows' own distances. Default: the head's (0.99: about 1% of images like the "
              "training ones are flagged).")
@click.option("--no-unknown", is_flag=True,
              help="Keep the label of unknown images (the unknown and novelty columns stay).")
@click.option("--coverage", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
              default=None, metavar="P",
              help="Add a conformal prediction set per image: the classes that hold the true one "
                   "with probability >= P (e.g. 0.9) on images like the training ones. Needs MAPIE "
                   "(pip install 'featx[conformal]') and a head fitted with --C auto.")
@recorded_backbone_option("head file")
@store_option
@batch_options
@device_option
@tta_option
@quiet_option
@json_option
def predict_cmd(head, inputs, out, top_k, min_proba, unknown_quantile, no_unknown, coverage, backbone,
                store, batch_size, workers, device, tta, quiet, as_json):
    """Predict the class of every image in INPUTS (files or folders) with HEAD (file or run dir)."""
    from featx.embed.scan import output_path
    from featx.predict import predict, write_predictions

    with progress_bar(quiet) as p:
        r = predict(head, list(inputs), backbone=backbone, device=device, store=store,
                    batch_size=batch_size, workers=workers, min_proba=min_proba,
                    unknown=not no_unknown, unknown_quantile=unknown_quantile, coverage=coverage, tta=tta,
                    progress=p)
    if out:
        write_predictions(r, out, top_k)
    k = min(top_k, len(r.classes))
    rows = r.rows(k)
    summary = {"images": len(r.files), "failed": len(r.failures), "abstained": r.abstained,
               "min_proba": min_proba, "unknown": r.n_unknown if r.unknown else None,
               "unknown_quantile": r.unknown_quantile, "unknown_threshold": r.unknown_threshold,
               "coverage": coverage, "out": str(out) if out else None,
               # --json names files as every featx output file does (absolute); the terminal as given
               "predictions": [{**row, "path": output_path(row["path"])} for row in rows],
               "failures": [{"path": output_path(f), "reason": why} for f, why in r.failures]}
    lines = [f"device: {r.provider} (asked: {device})"]
    if not out:
        for row in rows[:50]:
            tops = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in row["top"])
            label = "unknown" if row.get("unknown") and not no_unknown else row["predicted"] or "?"
            sets = f"\tset {{{', '.join(row['set'])}}}" if "set" in row else ""
            lines.append(f"{row['path']}\t{label}\t[{tops}]{sets}")
        if len(r.files) > 50:
            lines.append(f"... {len(r.files) - 50} more (use --out FILE.csv)")
    lines.append(f"{len(r.files)} images predicted, {len(r.failures)} failed"
                 + (f", {r.abstained - (0 if no_unknown else r.n_unknown)} below --min-proba "
                    f"{min_proba:g} (label left empty)" if min_proba is not None else "")
                 + (f", {r.n_unknown} unknown (unlike the training images: novelty > "
                    f"{r.unknown_threshold:.4f}, the training rows' {r.unknown_quantile:g} quantile"
                    + ("; labels kept" if no_unknown else "; label left empty") + ")"
                    if r.unknown else "")
                 + (f", sets at coverage {coverage:g} (mean size "
                    f"{r.sets.sum(1).mean() if len(r.files) else 0:.2f})" if r.sets is not None else "")
                 + (f"; wrote {out}" if out else ""))
    lines += _failure_lines(r.failures)
    emit(summary, as_json, lines)
    if not r.files:
        raise FeatXError("no image could be read")


@click.command("evaluate")
@head_argument
@click.argument("root", type=click.Path(exists=True, path_type=Path))
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where metrics.json, the plots, predictions.csv and report.html (error "
                   "analysis) go. Default: ./<ROOT name>.eval/")
@click.option("--force", is_flag=True,
              help="Replace --out-dir even if it holds the evaluation of another head or folder.")
@recorded_backbone_option("head file")
@store_option
@batch_options
@device_option
@tta_option
@quiet_option
@json_option
def evaluate_cmd(head, root, out_dir, force, backbone, store, batch_size, workers, device, tta, quiet,
                 as_json):
    """Evaluate HEAD on ROOT, a labelled folder (root/<class>/<image>) or a CSV/TSV/Parquet
    listing with path and label columns: accuracy, per-class scores, confusion matrix,
    calibration (ECE, reliability diagram), per-image losses and an error-analysis page."""
    from featx.evaluate import evaluate

    out_dir = out_dir or Path(f"{root.resolve().name if root.is_dir() else root.stem}.eval")
    with progress_bar(quiet) as p:
        r = evaluate(head, root, out_dir=out_dir, backbone=backbone, device=device, store=store,
                     batch_size=batch_size, workers=workers, force=force, tta=tta, progress=p)
    m = r.metrics
    present = sum(1 for v in m["per_class"].values() if v["support"])
    lines = [f"{m['n']} images of {present} classes (the head knows {len(r.prediction.classes)}): "
             f"accuracy {m['accuracy']:.4f}, balanced accuracy {m['balanced_accuracy']:.4f}, "
             f"macro F1 {m['macro_f1']:.4f}",
             f"calibration: ECE {m['calibration']['ece']:.4f} (mean confidence "
             f"{m['calibration']['mean_confidence']:.3f})",
             *_overlap_lines(m),
             f"{'class':<20} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    predicted = set(r.prediction.labels)
    for c, v in m["per_class"].items():
        if not v["support"] and c not in predicted:
            continue  # a class of the head that this folder does not have
        lines.append(f"{c:<20} {v['precision']:>9.3f} {v['recall']:>7.3f} {v['f1']:>7.3f} "
                     f"{v['support']:>8}")
    if m["unknown_classes"]:
        lines.append(f"warning: classes the head does not know: {', '.join(m['unknown_classes'])}")
    if m.get("flagged_unknown"):
        lines.append(f"{m['flagged_unknown']} of these images are unlike the head's training images "
                     "(featx predict would label them unknown); they are scored with their labels here")
    lines += _failure_lines(r.prediction.failures, str(r.json_path))
    lines += [f"wrote {f}" for f in r.files]
    emit({k: v for k, v in m.items() if k != "failures"}
         | {"metrics_json": str(r.json_path), "files": [str(f) for f in r.files]}, as_json, lines)


def _overlap_lines(m: dict) -> list[str]:
    """Whether the evaluated images were trained on: the caveat beside the numbers."""
    ov, d = m["overlap"], m.get("disjoint")
    if not ov["exact_checked"]:
        return [f"warning: overlap with the head's training rows not checked: {'; '.join(ov['notes'])}"]
    cos = f"cosine >= {ov['near_threshold']}"
    near = (f"{ov['near']} more near cop{'y' if ov['near'] == 1 else 'ies'} ({cos})" if ov["near_checked"]
            else "near copies not checked (" + "; ".join(ov["notes"]) + ")")
    if d is None:
        return [f"held out: none of the {ov['images']} images is a training row of the head; "
                + (f"no near copies ({cos})" if ov["near_checked"] else near)]
    if ov["exact"]:
        lines = [f"warning: NOT a held-out test: {ov['exact']} of {ov['images']} images are training "
                 f"rows of the head, {near}; the figures above are not test metrics"]
    else:
        lines = [f"held out, but {ov['near']} of {ov['images']} images have a near copy among the "
                 f"training rows ({cos}): the figures above may be optimistic"]
    if d["n"]:
        lines.append(f"on the {d['n']} images disjoint from training: accuracy {d['accuracy']:.4f}, "
                     f"balanced accuracy {d['balanced_accuracy']:.4f}, macro F1 {d['macro_f1']:.4f}, "
                     f"ECE {d['ece']:.4f}")
    else:
        lines.append("no image is disjoint from training: evaluate on a folder the head was not fitted on")
    return lines


def _outside(pre: dict) -> str:
    """The preprocessing a caller of the ONNX file does itself: all but mean/std."""
    return ", ".join(f"{k} {v}" for k, v in pre.items() if k not in ("mean", "std"))


@click.command("export-classifier")
@head_argument
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("classifier.onnx"), show_default=True)
@recorded_backbone_option("head file")
@json_option
def export_classifier_cmd(head, out, backbone, as_json):
    """One ONNX file: uint8 images (N, S, S, 3) -> label and class probabilities."""
    from featx.heads.onnx_classifier import export_classifier

    info = export_classifier(head, out, backbone=backbone)
    lines = [f"classifier: {info['path']} ({info['bytes'] / 1e6:.1f} MB)",
             f"  input {info['input']} uint8 {info['input_shape']}; outputs "
             f"{', '.join(info['outputs'])}; {len(info['classes'])} classes",
             f"  decode, resize and crop outside the graph (recipe in its featx.preprocess_recipe "
             f"metadata): {_outside(info['preprocess'])}; mean/std normalisation is inside it",
             f"  max |p - featx| on the check batch: {info['check_max_abs_diff']:.2e}"]
    emit(info, as_json, lines)
