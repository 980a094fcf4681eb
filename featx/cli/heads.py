"""CLI commands for heads: fit-head, predict, evaluate, export-classifier.

Added to the ``featx`` group in featx.cli.main; each command parses options,
calls one library function and renders its result.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from featx.cli.options import (
    batch_options,
    device_option,
    emit,
    json_option,
    progress_bar,
    store_option,
)
from featx.errors import FeatXError


class CParam(click.ParamType):
    """``auto`` or a positive float."""

    name = "C"

    def convert(self, value, param, ctx):
        if isinstance(value, float) or value == "auto":
            return value
        try:
            v = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'auto' nor a number", param, ctx)
        if not v > 0:
            self.fail(f"C must be > 0, got {value}", param, ctx)
        return v


def head_argument(f):
    return click.argument("head", metavar="HEAD", type=click.Path(exists=True, path_type=Path))(f)


def recorded_backbone_option(what: str):
    """--backbone for commands whose backbone is recorded (no env var: it must match)."""
    return click.option(
        "--backbone", "-b", default=None, metavar="NAME|DIR|FILE.onnx",
        help=f"Backbone (card name, export or run directory, ONNX file). Default: the one "
             f"recorded in the {what}; one with another fingerprint is refused.")


def quiet_option(f):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bar.")(f)


def _failure_lines(failures: list[tuple[str, str]], report: str | None = None) -> list[str]:
    lines = [f"  skipped {p}: {why}" for p, why in failures[:5]]
    if len(failures) > 5:
        lines.append(f"  ... {len(failures) - 5} more" + (f" (see {report})" if report else ""))
    return lines


@click.command("fit-head")
@click.option("--embeddings", "-e", type=click.Path(exists=True, path_type=Path), default=None,
              help="Embeddings table from `featx extract` (default: the last one extracted).")
@click.option("--head", "head_kind", type=click.Choice(["logreg", "linear-svm", "svm-rbf", "sgd-logreg"]),
              default="logreg", show_default=True,
              help="Classifier on the scaled embeddings; sgd-logreg streams the table shard by "
                   "shard (for tables larger than memory; --C is ignored, alpha is chosen on a "
                   "held-out split).")
@click.option("--C", "C", type=CParam(), default="auto", show_default=True, metavar="auto|FLOAT",
              help="Inverse regularisation; auto picks it by stratified CV over a log grid.")
@click.option("--class-weight", type=click.Choice(["none", "balanced"]), default="none",
              show_default=True, help="balanced reweights classes by inverse frequency.")
@click.option("--cv", type=click.IntRange(2, 20), default=5, show_default=True,
              help="Cross-validation folds for --C auto.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", type=click.Path(dir_okay=True, path_type=Path), default=None,
              help="Head file to write (or a directory for DIR/head.joblib). Default: ./head.joblib")
@recorded_backbone_option("embeddings table")
@json_option
def fit_head_cmd(embeddings, head_kind, C, class_weight, cv, seed, out, backbone, as_json):
    """Fit a classifier head on cached embeddings; writes the head file and a report."""
    from featx.embed.table import read_table
    from featx.heads.fit import fit_head
    from featx.heads.headfile import save_head

    table_path = embeddings or _last_table()
    if head_kind == "sgd-logreg":
        _fit_streaming(table_path, seed, out, backbone, as_json)
        return
    t = read_table(table_path)
    if not t.labelled:
        raise FeatXError(f"{table_path}: the images have no labels; extract an ImageFolder "
                         "tree (root/<class>/<image>) to fit a head")
    bb = _table_backbone(t, table_path, backbone)
    pipe, rep = fit_head(t.X, t.labels, head=head_kind, C=C,
                         class_weight=None if class_weight == "none" else class_weight,
                         cv=cv, seed=seed)
    rep["embeddings"] = str(Path(table_path).resolve())
    path = save_head(out or Path("head.joblib"), pipe, rep["classes"], bb, rep)
    report = path.with_name(path.name + ".report.json")
    report.write_text(json.dumps(rep, indent=2))
    summary = {**{k: v for k, v in rep.items() if k != "cv_grid"}, "head_file": str(path),
               "report": str(report)}
    lines = [f"{rep['head']} on {rep['n_train']} images x {rep['dim']}, {len(rep['classes'])} classes"]
    if rep["C_auto"]:
        lines.append(f"C = {rep['C']:g} (auto: {rep['cv_folds']}-fold CV on {rep['cv_rows']} rows, "
                     f"{rep['cv_metric']} {rep['cv_score_mean']:.4f} +- {rep['cv_score_std']:.4f})")
    else:
        lines.append(f"C = {rep['C']:g}")
    if not rep["converged"]:
        lines.append("warning: the solver did not fully converge; try a smaller C")
    lines += [f"training accuracy {rep['train_accuracy']:.4f} ({rep['seconds']} s)",
              f"head: {path}", f"report: {report}"]
    emit(summary, as_json, lines)

@click.command("predict")
@head_argument
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write predictions to .csv, .tsv or .json.")
@click.option("--top-k", type=click.IntRange(1, 1000), default=3, show_default=True)
@recorded_backbone_option("head file")
@store_option
@batch_options
@device_option
@quiet_option
@json_option
def predict_cmd(head, inputs, out, top_k, backbone, store, batch_size, workers, device, quiet,
                as_json):
    """Predict the class of every image in INPUTS (files or folders) with HEAD (file or run dir)."""
    from featx.predict import predict, write_predictions

    with progress_bar(quiet) as p:
        r = predict(head, list(inputs), backbone=backbone, device=device, store=store,
                    batch_size=batch_size, workers=workers, progress=p)
    if out:
        write_predictions(r, out, top_k)
    k = min(top_k, len(r.classes))
    summary = {"images": len(r.files), "failed": len(r.failures), "out": str(out) if out else None,
               "predictions": r.rows(k),
               "failures": [{"path": f, "reason": why} for f, why in r.failures]}
    lines = [f"device: {r.provider} (asked: {device})"]
    if not out:
        for row in summary["predictions"][:50]:
            tops = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in row["top"])
            lines.append(f"{row['path']}\t{row['label']}\t[{tops}]")
        if len(r.files) > 50:
            lines.append(f"... {len(r.files) - 50} more (use --out FILE.csv)")
    lines.append(f"{len(r.files)} images predicted, {len(r.failures)} failed"
                 + (f"; written to {out}" if out else ""))
    lines += _failure_lines(r.failures)
    emit(summary, as_json, lines)
    if not r.files:
        raise FeatXError("no image could be read")

@click.command("evaluate")
@head_argument
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where metrics.json and confusion_matrix.png go. Default: ./<ROOT name>.eval/")
@recorded_backbone_option("head file")
@store_option
@batch_options
@device_option
@quiet_option
@json_option
def evaluate_cmd(head, root, out_dir, backbone, store, batch_size, workers, device, quiet, as_json):
    """Evaluate HEAD on the labelled folder ROOT: accuracy, per-class scores, confusion matrix."""
    from featx.evaluate import evaluate

    out_dir = out_dir or Path(f"{root.resolve().name}.eval")
    with progress_bar(quiet) as p:
        r = evaluate(head, root, out_dir=out_dir, backbone=backbone, device=device, store=store,
                     batch_size=batch_size, workers=workers, progress=p)
    m = r.metrics
    lines = [f"{m['n']} images, {len(m['labels'])} classes: accuracy {m['accuracy']:.4f}, "
             f"balanced accuracy {m['balanced_accuracy']:.4f}, macro F1 {m['macro_f1']:.4f}",
             f"{'class':<20} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    predicted = set(r.prediction.labels)
    for c, v in m["per_class"].items():
        if not v["support"] and c not in predicted:
            continue  # a class of the head that this folder does not have
        lines.append(f"{c:<20} {v['precision']:>9.3f} {v['recall']:>7.3f} {v['f1']:>7.3f} "
                     f"{v['support']:>8}")
    if m["unknown_classes"]:
        lines.append(f"warning: classes the head does not know: {', '.join(m['unknown_classes'])}")
    lines += _failure_lines(r.prediction.failures, str(r.json_path))
    lines += [f"confusion matrix: {r.png_path}", f"metrics: {r.json_path}"]
    emit({k: v for k, v in m.items() if k != "failures"} | {"metrics_json": str(r.json_path)},
         as_json, lines)

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
             f"  preprocessing outside the graph: {info['preprocess']}",
             f"  max |p - featx| on the check batch: {info['check_max_abs_diff']:.2e}"]
    emit(info, as_json, lines)


def _last_table() -> Path:
    from featx.engines.result import last_extract

    last = last_extract()
    if not last or not Path(last["out"]).exists():
        raise FeatXError("no embeddings given and no previous `featx extract` to default to; "
                         "run `featx extract DATA` first or pass --embeddings TABLE.parquet")
    return Path(last["out"])


def _fit_streaming(table_path, seed, out, backbone, as_json) -> None:
    """fit-head --head sgd-logreg: memory for one shard, not the table."""
    from types import SimpleNamespace

    from featx.heads.headfile import save_head
    from featx.heads.streaming import fit_streaming_head, table_meta

    with progress_bar() as p:
        pipe, rep = fit_streaming_head(table_path, seed=seed, progress=p)
    meta = table_meta(table_path)
    bb = _table_backbone(SimpleNamespace(meta=meta, fingerprint=meta.get("fingerprint", "")),
                         table_path, backbone)
    d = {**rep.to_dict(), "head": "sgd-logreg", "embeddings": str(Path(table_path).resolve())}
    path = save_head(out or Path("head.joblib"), pipe, rep.classes, bb, d)
    report = path.with_name(path.name + ".report.json")
    report.write_text(json.dumps(d, indent=2))
    val = f"{rep.val_accuracy:.4f}" if rep.val_accuracy is not None else "n/a"
    emit({**d, "head_file": str(path), "report": str(report)}, as_json, [
        f"sgd-logreg on {rep.rows} images x {rep.dim}, {len(rep.classes)} classes, streamed "
        f"(at most {rep.max_rows_in_memory} rows in memory)",
        f"alpha = {rep.alpha:g} (held-out accuracy {val}, {rep.epochs} epochs, {rep.seconds:.1f} s)",
        f"head: {path}", f"report: {report}"])


def _table_backbone(t, table_path, override):
    """The backbone that made a table: --backbone, or the export dir its metadata names."""
    from featx.backbones.resolve import resolve_backbone

    spec = override or t.meta.get("backbone_path") or t.meta.get("backbone")
    if not spec:
        raise FeatXError(f"{table_path}: no backbone recorded; pass --backbone")
    try:
        bb = resolve_backbone(spec)
    except FeatXError:
        if override or not t.meta.get("backbone"):
            raise
        bb = resolve_backbone(t.meta["backbone"])  # export dir gone: re-export the card
    if t.fingerprint and bb.fingerprint != t.fingerprint:
        from featx.errors import MismatchError

        raise MismatchError(f"{table_path} was extracted with backbone fingerprint {t.fingerprint}, "
                            f"but {spec} has {bb.fingerprint}; pass the backbone that made it with "
                            "--backbone, or extract again")
    return bb
