"""``featx evaluate``: a head on a labelled folder -> metrics, plots and an error-analysis page.

Besides accuracy and per-class scores, the metrics hold the head's calibration: the
expected calibration error (ECE) of its top-label confidence over equal-width bins,
and the bins themselves, drawn as a reliability diagram beside the confusion matrix.
The output folder also gets the per-image outcomes, the top losses and an HTML page
(``featx.error_analysis``).

A test metric is only one if the images were not trained on: ``training_overlap``
finds the evaluated images that are training rows of the head (by content key, which
fit-head records in the head file) and near copies of them (cosine similarity of the
embeddings against the head's training table, when it is still on disk), and the
metrics are reported on the disjoint part as well.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.atomic import figure, write_text
from featx.backbones.artifact import Backbone
from featx.embed.scan import output_path
from featx.error_analysis import confused_pairs, write_error_analysis
from featx.errors import FeatXError
from featx.heads.headfile import Head, key_digests, load_head
from featx.modelcard import record_evaluation
from featx.predict import PredictResult, predict
from featx.progress import ProgressFn, no_progress
from featx.similarity.near_duplicates import DEFAULT_THRESHOLD

__all__ = ["EvalResult", "calibration", "compute_metrics", "evaluate", "training_overlap"]

METRICS_FILE = "metrics.json"
CONFUSION_PNG = "confusion_matrix.png"
RELIABILITY_PNG = "reliability.png"
ECE_BINS = 15


@dataclass
class EvalResult:
    """What ``evaluate`` measured and wrote (``files`` lists every file written)."""

    metrics: dict
    prediction: PredictResult
    json_path: Path | None
    png_path: Path | None
    reliability_path: Path | None = None
    files: list[Path] = field(default_factory=list)


def compute_metrics(y_true: list[str], y_pred: list[str], classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, per-class precision/recall/F1/support, confusion matrix."""
    from sklearn.metrics import balanced_accuracy_score, classification_report, confusion_matrix

    labels = list(classes) + sorted(set(y_true) - set(classes))
    with warnings.catch_warnings():
        # a class of the head missing from this folder is expected, not news: sklearn's
        # "y_pred contains classes not in y_true" would only leak into the CLI's output
        warnings.simplefilter("ignore", UserWarning)
        rep = classification_report(y_true, y_pred, labels=labels, output_dict=True, zero_division=0)
        balanced = float(balanced_accuracy_score(y_true, y_pred))
    per_class = {c: {"precision": float(rep[c]["precision"]), "recall": float(rep[c]["recall"]),
                     "f1": float(rep[c]["f1-score"]), "support": int(rep[c]["support"])}
                 for c in labels}
    return {
        "n": len(y_true),
        "accuracy": float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if y_true else 0.0,
        "balanced_accuracy": balanced,
        "macro_f1": float(np.mean([v["f1"] for v in per_class.values() if v["support"]])),
        "per_class": per_class,
        "labels": labels,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "unknown_classes": sorted(set(y_true) - set(classes)),
    }


def calibration(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Top-label calibration: ECE over ``n_bins`` equal-width confidence bins, and the bins.

    ECE = sum over bins of (bin's share of images) x |accuracy - mean confidence|: 0 for
    a head whose "90% sure" is right 90% of the time.
    """
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, bool)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 goes to the first bin
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for i in range(n_bins):
        m = which == i
        if not m.any():
            continue
        conf, acc = float(confidence[m].mean()), float(correct[m].mean())
        ece += m.sum() / len(confidence) * abs(acc - conf)
        bins.append({"lo": float(edges[i]), "hi": float(edges[i + 1]), "count": int(m.sum()),
                     "confidence": conf, "accuracy": acc})
    return {"ece": float(ece), "n_bins": n_bins, "kind": "top-label", "bins": bins,
            "mean_confidence": float(confidence.mean()) if len(confidence) else 0.0}


def training_overlap(head: Head, keys: list[str], X: np.ndarray | None,
                     threshold: float = DEFAULT_THRESHOLD) -> tuple[dict, np.ndarray, np.ndarray]:
    """Which evaluated images the head was trained on: (summary, exact mask, near-copy mask).

    Exact: the image's content key is one of the training rows' (the digests fit-head
    records in the head; for an older head, the keys of its training table). Near copy:
    not exact, but its embedding has cosine similarity >= ``threshold`` with a training
    row's (needs the training table, whose path the head records, still on disk). The
    summary says what could be checked and why not.
    """
    n = len(keys)
    exact, near = np.zeros(n, bool), np.zeros(n, bool)
    table, notes = _training_table(head)
    if head.train_keys is not None:
        exact = np.isin(key_digests(keys), head.train_keys)
        how = "content keys recorded in the head"
    elif table is not None:
        train = set(table.keys)
        exact = np.fromiter((k in train for k in keys), bool, n)
        how = "content keys of the training table"
    else:
        how = None
        notes.append("the head records no training keys (fitted before featx recorded them)")
    near_checked = table is not None and table.X is not None and len(table) > 0 and X is not None
    if near_checked and n:
        from featx.similarity.topk import search

        sim = search(np.asarray(X, np.float32), table.X, k=1, index="exact").similarity[:, 0]
        near = (sim >= threshold) & ~exact
    summary = {"exact_checked": how is not None, "exact_by": how, "exact": int(exact.sum()),
               "near_checked": bool(near_checked), "near": int(near.sum()),
               "near_threshold": threshold, "images": n, "notes": notes,
               "training_table": head.meta.get("train", {}).get("embeddings")}
    return summary, exact, near


def _training_table(head: Head):
    """The head's training table (embeddings + keys), or None and why not."""
    from featx.embed.table import read_table

    where = (head.meta.get("train") or {}).get("embeddings")
    if not where:
        return None, ["the head records no training table, so near copies were not checked"]
    if Path(where).is_dir():
        return None, [f"its training table {where} is a folder of tables; near copies not checked"]
    if not Path(where).is_file():
        return None, [f"its training table {where} is gone, so near copies were not checked"]
    try:
        t = read_table(where)
    except (FeatXError, OSError) as e:
        return None, [f"its training table {where} cannot be read ({e}); near copies not checked"]
    if t.fingerprint and t.fingerprint != head.fingerprint:
        return None, [f"{where} now holds embeddings of another backbone; near copies not checked"]
    return t, []


def plot_confusion(cm: np.ndarray, labels: list[str], path: Path, title: str) -> Path:
    """Write a confusion matrix (counts, rows = true class) as a PNG."""
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(labels)
    with figure(path, figsize=(max(4.0, 0.6 * n + 2), max(3.5, 0.6 * n + 1.5)), dpi=100) as (_fig, ax):
        ConfusionMatrixDisplay(cm, display_labels=labels).plot(
            ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45 if n > 4 else "horizontal",
            values_format="d")
        ax.set_title(title)
    return Path(path)


def plot_reliability(cal: dict, path: Path, title: str) -> Path:
    """Write a reliability diagram: accuracy per confidence bin against the diagonal."""
    with figure(path, nrows=2, ncols=1, figsize=(4.5, 5.5), dpi=100, sharex=True,
                gridspec_kw={"height_ratios": [3, 1]}) as (_fig, (ax, hist)):
        width = 1.0 / cal["n_bins"]
        bins = cal["bins"]
        ax.bar([b["lo"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge",
               edgecolor="black", color="tab:blue", label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.bar([b["lo"] for b in bins], [b["confidence"] - b["accuracy"] for b in bins], width=width,
               bottom=[b["accuracy"] for b in bins], align="edge", color="tab:red", alpha=0.3,
               hatch="//", edgecolor="tab:red", label="gap to mean confidence")
        ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"{title}: ECE {cal['ece']:.3f}")
        ax.legend(loc="upper left", fontsize=8)
        hist.bar([b["lo"] for b in bins], [b["count"] for b in bins], width=width, align="edge",
                 edgecolor="black", color="tab:gray")
        hist.set(xlabel="confidence (top-class probability)", ylabel="images")
        hist.yaxis.get_major_locator().set_params(integer=True)
    return Path(path)


def check_out_dir(out: Path, head: Head, root: Path, force: bool) -> None:
    """Refuse to overwrite another head's or folder's evaluation unless ``force``."""
    prev = out / METRICS_FILE
    if force or not prev.is_file():
        return
    try:
        old = json.loads(prev.read_text())
        if isinstance(old, dict) and "head" not in old:
            return  # written by a featx that did not record whose evaluation it was
        # older featx recorded the paths as given: compare them resolved
        same = (head.path is not None and isinstance(old.get("head"), str)
                and Path(old["head"]).resolve() == head.path.resolve()
                and isinstance(old.get("root"), str) and Path(old["root"]).resolve() == root.resolve())
    except (OSError, ValueError, AttributeError):
        old, same = {}, False
    if not same:
        raise FeatXError(f"{out} already holds the evaluation of {old.get('head') or 'another head'} "
                         f"on {old.get('root') or 'another folder'}; pass --force to replace it, "
                         "or --out-dir to write elsewhere")


def evaluate(head: Head | str | os.PathLike, root: str | os.PathLike, *,
             out_dir: str | os.PathLike | None = None,
             backbone: str | os.PathLike | Backbone | None = None, device: str = "auto",
             store: str | os.PathLike | None = None, batch_size: int = 32,
             workers: int | None = None, force: bool = False, tta: str = "none",
             progress: ProgressFn = no_progress) -> EvalResult:
    """Evaluate ``head`` on ``root``: a labelled ImageFolder, or a CSV/TSV/Parquet listing
    with ``path`` and ``label`` columns (``featx.embed.scan.scan_table``).

    Writes ``metrics.json``, ``confusion_matrix.png``, ``reliability.png``,
    ``predictions.csv``, ``top_losses.png`` and ``report.html`` into ``out_dir`` (when
    given), and then records the metrics in the head's model card (``featx.modelcard``); an ``out_dir`` holding the evaluation of another head or
    folder is refused unless ``force``. Images whose class folder the head does not
    know count as errors and are listed under ``unknown_classes``.
    """
    h = head if isinstance(head, Head) else load_head(head)
    root = Path(root)
    if out_dir is not None:
        check_out_dir(Path(out_dir), h, root, force)
    # every image keeps its label (an unknown one counts as the class it was given);
    # how many the head would flag as unknown is reported beside the metrics
    res = predict(h, [root], backbone=backbone, device=device, store=store,
                  batch_size=batch_size, workers=workers, tta=tta, unknown=False, progress=progress)
    if any(t is None for t in res.true_labels) or not res.files:
        raise FeatXError(f"{root}: evaluate needs labelled images: an ImageFolder tree "
                         "(root/<class>/<image>) or a listing with a label column for every row; "
                         "for unlabelled images use `featx predict`")
    truth = [str(t) for t in res.true_labels]
    if not set(truth) & set(h.classes):
        raise FeatXError(f"{root}: none of its class folders ({', '.join(sorted(set(truth))[:5])}) "
                         f"is a class of the head ({', '.join(h.classes[:5])}); wrong folder?")
    pred = [str(p) for p in res.labels]
    m = compute_metrics(truth, pred, res.classes)
    correct = np.asarray(truth) == np.asarray(pred)
    m["calibration"] = calibration(res.proba.max(axis=1), correct)
    m["overlap"], exact, near = training_overlap(h, res.keys, res.embeddings)
    m["disjoint"] = _disjoint(truth, pred, res, ~(exact | near)) if (exact | near).any() else None
    m["held_out"] = bool(m["overlap"]["exact_checked"] and not (exact | near).any())
    m.update({"head": str(h.path.resolve()) if h.path else None, "root": str(root.resolve()),
              "head_sha256": h.meta.get("content_sha256") or h.meta.get("payload_sha256"),
              "failed": len(res.failures),
              "flagged_unknown": res.n_unknown if res.unknown else None,
              "failures": [{"path": output_path(p), "reason": r} for p, r in res.failures],
              "backbone": h.backbone_name, "fingerprint": h.fingerprint,
              "tta": tta})  # a flip-averaged accuracy says so
    if out_dir is None:
        return EvalResult(m, res, None, None)
    r = _write(m, res, Path(out_dir), root)
    card = record_evaluation(h.path, m, r.json_path) if h.path else None  # the head's model card
    return dataclasses.replace(r, files=[*r.files, card]) if card else r


def _disjoint(truth: list[str], pred: list[str], res: PredictResult, keep: np.ndarray) -> dict:
    """The headline metrics on the images that are neither training rows nor near copies."""
    idx = np.flatnonzero(keep)
    if not len(idx):
        return {"n": 0}
    t, p = [truth[i] for i in idx], [pred[i] for i in idx]
    d = compute_metrics(t, p, res.classes)
    cal = calibration(res.proba[idx].max(axis=1), np.asarray(t) == np.asarray(p))
    return {"n": d["n"], "accuracy": d["accuracy"], "balanced_accuracy": d["balanced_accuracy"],
            "macro_f1": d["macro_f1"], "ece": cal["ece"]}


def _write(m: dict, res: PredictResult, out: Path, root: Path) -> EvalResult:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FeatXError(f"cannot create {out}: {e.strerror or e}") from None
    png = plot_confusion(np.asarray(m["confusion_matrix"]), m["labels"], out / CONFUSION_PNG,
                         f"{root.name}: accuracy {m['accuracy']:.1%} (n={m['n']})")
    rel = plot_reliability(m["calibration"], out / RELIABILITY_PNG, root.name)
    m["confusion_matrix_png"], m["reliability_png"] = str(png), str(rel)
    m["most_confused"] = confused_pairs(np.asarray(m["confusion_matrix"]), m["labels"])
    truth = [str(t) for t in res.true_labels]
    extra = write_error_analysis(m, res.files, truth, [str(p) for p in res.labels], res.proba,
                                 res.classes, out, [png, rel])
    json_path = write_text(out / METRICS_FILE, json.dumps(m, indent=2))
    return EvalResult(m, res, json_path, png, rel, [json_path, png, rel, *extra])
