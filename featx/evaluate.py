"""``featx evaluate``: a head on a labelled folder -> metrics JSON + confusion-matrix PNG."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx.backbones.artifact import Backbone
from featx.errors import FeatXError
from featx.heads.headfile import Head, load_head
from featx.predict import PredictResult, predict
from featx.progress import ProgressFn, no_progress


@dataclass
class EvalResult:
    metrics: dict
    prediction: PredictResult
    json_path: Path | None
    png_path: Path | None


def compute_metrics(y_true: list[str], y_pred: list[str], classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, per-class precision/recall/F1/support, confusion matrix."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    labels = list(classes) + sorted(set(y_true) - set(classes))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                     "support": int(s[i])} for i, c in enumerate(labels)}
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(np.mean([v["f1"] for c, v in per_class.items() if v["support"]])),
        "per_class": per_class,
        "labels": labels,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "unknown_classes": sorted(set(y_true) - set(classes)),
    }


def plot_confusion(cm: np.ndarray, labels: list[str], path: Path, title: str) -> Path:
    """Write a confusion matrix (counts, rows = true class) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and never pop up a window
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * n + 2), max(3.5, 0.6 * n + 1.5)), dpi=100)
    try:
        ConfusionMatrixDisplay(cm, display_labels=labels).plot(
            ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45 if n > 4 else "horizontal",
            values_format="d")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def evaluate(head: Head | str | os.PathLike, root: str | os.PathLike, *,
             out_dir: str | os.PathLike | None = None,
             backbone: str | os.PathLike | Backbone | None = None, device: str = "auto",
             store: str | os.PathLike | None = None, batch_size: int = 32,
             workers: int | None = None, progress: ProgressFn = no_progress) -> EvalResult:
    """Evaluate ``head`` on the labelled ImageFolder ``root``.

    Writes ``metrics.json`` and ``confusion_matrix.png`` into ``out_dir`` (when
    given); images whose class folder the head does not know count as errors and
    are listed under ``unknown_classes``.
    """
    h = head if isinstance(head, Head) else load_head(head)
    root = Path(root)
    res = predict(h, [root], backbone=backbone, device=device, store=store,
                  batch_size=batch_size, workers=workers, progress=progress)
    if any(t is None for t in res.true_labels) or not res.files:
        raise FeatXError(f"{root}: evaluate needs a labelled ImageFolder tree (root/<class>/<image>) "
                         "with readable images; for unlabelled images use `featx predict`")
    truth = [str(t) for t in res.true_labels]
    if not set(truth) & set(h.classes):
        raise FeatXError(f"{root}: none of its class folders ({', '.join(sorted(set(truth))[:5])}) "
                         f"is a class of the head ({', '.join(h.classes[:5])}); wrong folder?")
    m = compute_metrics(truth, res.labels, res.classes)
    m.update({"head": str(h.path) if h.path else None, "root": str(root.resolve()),
              "failed": len(res.failures),
              "failures": [{"path": p, "reason": r} for p, r in res.failures],
              "backbone": h.backbone_name, "fingerprint": h.fingerprint})
    json_path = png_path = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        png_path = plot_confusion(np.asarray(m["confusion_matrix"]), m["labels"],
                                  out / "confusion_matrix.png",
                                  f"{root.name}: accuracy {m['accuracy']:.1%} (n={m['n']})")
        m["confusion_matrix_png"] = str(png_path)
        json_path = out / "metrics.json"
        json_path.write_text(json.dumps(m, indent=2))
    return EvalResult(m, res, json_path, png_path)
