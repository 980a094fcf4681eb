"""Error analysis for ``featx evaluate``: per-image outcomes, the worst mistakes, an HTML page.

``write_error_analysis`` writes, beside the metrics:

* ``predictions.csv``: path, true, predicted, probability (of the prediction),
  true_probability, loss (cross-entropy of the true class; empty for a class the head
  does not know), correct: one row per image, the worst first;
* ``top_losses.png``: a grid of the highest-loss images, titled true / predicted / p;
* ``report.html``: the headline metrics with the per-class precision / recall / F1 /
  support table and macro F1, the confusion matrix (counts, and normalised by true
  class) whose cells link to their images, and the most confused pairs. The page is
  self-contained: the plots and the thumbnails are embedded in it (data: URIs), so it
  still shows them when moved or mailed; only the links to the full-size images point
  at the image files (relative to the page, as they were when it was written).

It takes plain lists and arrays, so it sits below the jobs that produce them.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np

from featx.atomic import figure, write_text
from featx.csvout import csv_writer
from featx.embed.images import thumbnail
from featx.embed.remote import is_url
from featx.embed.scan import display_path, output_path

__all__ = ["image_outcomes", "thumbnail", "write_error_analysis"]

PREDICTIONS_CSV = "predictions.csv"
TOP_LOSSES_PNG = "top_losses.png"
REPORT_HTML = "report.html"
TOP_LOSSES = 16
IMAGES_PER_CELL = 60


def image_outcomes(files: Sequence[str], truth: Sequence[str], pred: Sequence[str],
                   proba: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """One dict per image (keys as the CSV's columns), highest loss first.

    Images of a class the head does not know have no true probability and no loss;
    they come after every image that has one.
    """
    col = {c: j for j, c in enumerate(classes)}
    rows = []
    for i, (f, t, p) in enumerate(zip(files, truth, pred, strict=True)):
        pt = float(proba[i, col[t]]) if t in col else None
        rows.append({"path": f, "true": t, "predicted": p, "probability": float(proba[i].max()),
                     "true_probability": pt,
                     "loss": float(-np.log(max(pt, 1e-15))) if pt is not None else None,
                     "correct": t == p})
    rows.sort(key=lambda r: (r["loss"] is None, -(r["loss"] or 0.0)))
    return rows


def write_predictions_csv(rows: list[dict], path: Path) -> Path:
    buf = io.StringIO(newline="")
    cols = ["path", "true", "predicted", "probability", "true_probability", "loss", "correct"]
    w = csv_writer(buf)
    rows = [{**r, "path": output_path(r["path"])} for r in rows]  # absolute, non-UTF-8 names as \\xNN
    w.writerow(cols)
    for r in rows:
        r = {**r, **{k: "" if r[k] is None else f"{r[k]:.6f}" for k in ("probability", "true_probability", "loss")}}
        w.writerow(["" if r[c] is None else r[c] for c in cols])
    return write_text(path, buf.getvalue())


def plot_top_losses(rows: list[dict], path: Path, k: int = TOP_LOSSES) -> Path | None:
    """A grid of the ``k`` highest-loss images (None when no image has a loss)."""
    worst = [r for r in rows if r["loss"] is not None][:k]
    if not worst:
        return None
    cols = min(4, len(worst))
    nrows = -(-len(worst) // cols)
    with figure(path, nrows=nrows, ncols=cols, figsize=(2.6 * cols, 2.9 * nrows), dpi=100,
                squeeze=False) as (fig, axes):
        for ax, r in zip(axes.flat, worst + [None] * (nrows * cols - len(worst)), strict=True):
            ax.axis("off")
            if r is None:
                continue
            img = thumbnail(r["path"], 192)
            if img is not None:
                ax.imshow(img)
            ax.set_title(f"{r['true']} / {r['predicted']}\np={r['probability']:.2f} loss={r['loss']:.2f}",
                         fontsize=8, color="black" if r["correct"] else "tab:red")
        fig.suptitle("top losses: true / predicted", fontsize=10)
    return Path(path)


def _href(path: str, out_dir: Path) -> str:
    if is_url(path):  # as listed (a browser opens http(s):// and file://), escaped for the attribute
        return html.escape(path, quote=True)
    try:
        rel = os.path.relpath(path, out_dir)
    except ValueError:  # another drive on Windows
        rel = os.path.abspath(path)
    return quote(rel.replace(os.sep, "/"), safe="/")


THUMB_PX = 96


def _thumb_uri(path: str) -> str | None:
    """A small JPEG of the image as a data: URI, or None when it cannot be read now."""
    from PIL import Image

    a = thumbnail(path, THUMB_PX)
    if a is None:
        return None
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _png_uri(path: Path) -> str:
    try:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return quote(path.name)


def _per_class_html(metrics: dict) -> str:
    e = html.escape
    rows = "".join(f"<tr><th>{e(c)}</th><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td>"
                   f"<td>{v['f1']:.3f}</td><td>{v['support']}</td></tr>"
                   for c, v in metrics.get("per_class", {}).items() if v["support"])
    return ("<h2>Per class</h2><table class=pc><tr><th>class</th><th>precision</th><th>recall</th>"
            f"<th>F1</th><th>support</th></tr>{rows}<tr><th>macro average</th><td></td><td></td>"
            f"<td>{metrics.get('macro_f1', float('nan')):.3f}</td><td>{metrics.get('n', '')}</td></tr></table>")


def _overlap_html(metrics: dict) -> str:
    ov, d = metrics.get("overlap"), metrics.get("disjoint")
    if not ov:
        return ""
    if not ov.get("exact_checked"):
        return f"<p class=warn>Overlap with the head's training rows not checked: {html.escape('; '.join(ov.get('notes', [])))}.</p>"
    if d is None:
        return f"<p>Held out: none of the {ov['images']} images is a training row of the head.</p>"
    what = (f"<b>Not a held-out test</b>: {ov['exact']} of {ov['images']} images are training rows of the head"
            if ov["exact"] else f"Held out, but {ov['near']} of {ov['images']} images have a near copy in training")
    rest = (f"; on the {d['n']} images disjoint from training: accuracy {d['accuracy']:.4f}, macro F1 "
            f"{d['macro_f1']:.4f}" if d.get("n") else "; no image is disjoint from training")
    return f"<p class=warn>{what} ({ov['near']} near copies, cosine >= {ov['near_threshold']}){rest}.</p>"


def confused_pairs(cm: np.ndarray, labels: Sequence[str], n: int = 10) -> list[dict]:
    """The ``n`` largest off-diagonal cells: (true, predicted, count), most first."""
    pairs = [{"true": labels[i], "predicted": labels[j], "count": int(cm[i, j])}
             for i in range(len(labels)) for j in range(len(labels)) if i != j and cm[i, j]]
    return sorted(pairs, key=lambda p: -p["count"])[:n]


def _matrix_html(cm: np.ndarray, labels: Sequence[str], normalised: bool) -> str:
    e = html.escape
    rows_sum = cm.sum(axis=1, keepdims=True)
    shown = np.divide(cm, rows_sum, out=np.zeros(cm.shape), where=rows_sum > 0) if normalised else cm
    head = "".join(f"<th>{e(c)}</th>" for c in labels)
    body = []
    for i, t in enumerate(labels):
        cells = []
        for j in range(len(labels)):
            v = f"{shown[i, j]:.2f}" if normalised else str(int(cm[i, j]))
            shade = shown[i, j] if normalised else (cm[i, j] / rows_sum[i, 0] if rows_sum[i, 0] else 0)
            style = f' style="background: rgba(31,119,180,{0.8 * float(shade):.2f})"'
            link = f'<a href="#cell-{i}-{j}">{v}</a>' if cm[i, j] else v
            cells.append(f"<td{style}>{link}</td>")
        body.append(f"<tr><th>{e(t)}</th>{''.join(cells)}</tr>")
    caption = "normalised by true class (recall on the diagonal)" if normalised else "counts"
    return (f"<table class=cm><caption>{caption}; rows: true, columns: predicted</caption>"
            f"<tr><th></th>{head}</tr>{''.join(body)}</table>")


def write_report_html(metrics: dict, rows: list[dict], out_dir: Path, pngs: Sequence[Path]) -> Path:
    """The error-analysis page (see the module docstring)."""
    e = html.escape
    labels = list(metrics["labels"])
    cm = np.asarray(metrics["confusion_matrix"])
    index = {c: i for i, c in enumerate(labels)}
    cells: dict[tuple[int, int], list[dict]] = {}
    for r in rows:  # rows are worst first, so each cell lists its worst images first
        if r["true"] in index and r["predicted"] in index:
            cells.setdefault((index[r["true"]], index[r["predicted"]]), []).append(r)
    parts = [f"<h1>{e(str(metrics.get('root', '')))}</h1>",
             f"<p>head {e(str(metrics.get('head', '')))}: accuracy {metrics['accuracy']:.4f}, "
             f"balanced accuracy {metrics['balanced_accuracy']:.4f}, macro F1 "
             f"{metrics.get('macro_f1', float('nan')):.4f}, n = {metrics['n']}, "
             f"ECE {metrics.get('calibration', {}).get('ece', float('nan')):.4f}. "
             f"Every image: <a href='{PREDICTIONS_CSV}'>{PREDICTIONS_CSV}</a>.</p>",
             _overlap_html(metrics),
             "".join(f"<img src='{_png_uri(p)}' alt='{e(p.name)}'> " for p in pngs),
             _per_class_html(metrics),
             "<h2>Confusion matrix</h2><div class=row>",
             _matrix_html(cm, labels, False), _matrix_html(cm, labels, True), "</div>",
             "<h2>Most confused pairs</h2><table><tr><th>true</th><th>predicted</th><th>images</th></tr>"]
    for p in confused_pairs(cm, labels):
        i, j = index[p["true"]], index[p["predicted"]]
        parts.append(f"<tr><td>{e(p['true'])}</td><td>{e(p['predicted'])}</td>"
                     f"<td><a href='#cell-{i}-{j}'>{p['count']}</a></td></tr>")
    parts.append("</table><h2>Images by cell (worst first)</h2>")
    for (i, j), members in sorted(cells.items()):
        more = len(members) - IMAGES_PER_CELL
        parts.append(f"<h3 id='cell-{i}-{j}'>true {e(labels[i])}, predicted {e(labels[j])}: "
                     f"{len(members)}</h3><div class=grid>")
        for r in members[:IMAGES_PER_CELL]:
            href = _href(display_path(r["path"]), out_dir)
            tip = f"{display_path(r['path'])} p={r['probability']:.3f}"
            src = _thumb_uri(r["path"]) or href
            parts.append(f"<a href='{href}' title='{e(tip)}'><img src='{src}' loading=lazy></a>")
        parts.append("</div>" + (f"<p>... {more} more in {PREDICTIONS_CSV}</p>" if more > 0 else ""))
    style = ("body{font-family:sans-serif;margin:2em} table.cm td{text-align:center;min-width:3em}"
             " table{border-collapse:collapse;margin:0 2em 1em 0} td,th{border:1px solid #ccc;"
             "padding:2px 6px} .row{display:flex;flex-wrap:wrap} .grid img{height:96px;margin:2px}"
             " .warn{color:#a40}")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>featx evaluate</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    return write_text(out_dir / REPORT_HTML, page)


def write_error_analysis(metrics: dict, files: Sequence[str], truth: Sequence[str],
                         pred: Sequence[str], proba: np.ndarray, classes: Sequence[str],
                         out_dir: Path, pngs: Sequence[Path] = ()) -> list[Path]:
    """Write predictions.csv, top_losses.png and report.html into ``out_dir``; returns them."""
    rows = image_outcomes(files, truth, pred, proba, classes)
    written = [write_predictions_csv(rows, out_dir / PREDICTIONS_CSV)]
    top = plot_top_losses(rows, out_dir / TOP_LOSSES_PNG)
    if top is not None:
        written.append(top)
    written.append(write_report_html(metrics, rows, out_dir, [*pngs, *written[1:]]))
    return written
