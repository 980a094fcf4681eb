"""A run's files written as it goes: atomic JSON, the metrics log and the training curve."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from featx.atomic import atomic_path, figure, write_text


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON, written atomically (unique temporary name, fsync, rename)."""
    write_text(path, json.dumps(obj, indent=2, default=str))


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 epoch``, ``2 epochs``: a count with its noun in the right number."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr_head", "lr_backbone",
                 "images", "seconds", "images_per_second"]


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    write_json(run_dir / "metrics.json", history)
    with atomic_path(run_dir / "metrics.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)


def plot_curve(run_dir: Path, history: list[dict], best_epoch: int) -> Path | None:
    """curve.png: loss and accuracy per epoch, train and validation."""
    if not history:
        return None
    ep = [h["epoch"] for h in history]
    out = run_dir / "curve.png"
    with figure(out, nrows=1, ncols=2, figsize=(10, 4), dpi=100) as (fig, (a1, a2)):
        a1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
        a1.plot(ep, [h["val_loss"] for h in history], "s-", label="validation")
        a1.set_xlabel("epoch")
        a1.set_ylabel("loss")
        a2.plot(ep, [h["train_acc"] for h in history], "o-", label="train")
        a2.plot(ep, [h["val_acc"] for h in history], "s-", label="validation")
        a2.set_xlabel("epoch")
        a2.set_ylabel("accuracy")
        for a in (a1, a2):
            a.axvline(best_epoch, color="grey", ls=":", label=f"best (epoch {best_epoch})")
            a.grid(alpha=0.3)
            a.legend()
        fig.suptitle(f"featx finetune: {run_dir.name}")
    return out

