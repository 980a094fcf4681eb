"""Stratified sampling: the one home for "some images of each class".

Used by compare (learning curves), fine-tuning (validation split), int8
calibration and the examples. Seeded and deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["per_class_subset", "spread_over_classes", "stratified_split"]


def per_class_subset(labels: np.ndarray, per_class: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of up to ``per_class`` examples of each class (all when None).

    For one seed the subsets are nested: the 20-a-class subset contains the 5-a-class
    one, so a learning curve adds data rather than redrawing it.
    """
    labels = np.asarray(labels)
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    idx = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(idx)) if idx else np.zeros(0, np.int64)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) sorted indices, ``fraction`` of each class held out.

    Unlike ``sklearn.model_selection.train_test_split(stratify=...)``, which refuses a
    class with one member and may leave a small class without training images, every
    class keeps at least one training image; the held-out count is rounded per class.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    tr, va = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(round(len(idx) * fraction), len(idx) - 1)
        va.extend(idx[:n_val])
        tr.extend(idx[n_val:])
    return np.sort(np.array(tr, dtype=np.int64)), np.sort(np.array(va, dtype=np.int64))


def spread_over_classes(labels: Sequence, n: int, seed: int = 0) -> list[int]:
    """Up to ``n`` indices taken round-robin over the classes, each class in a seeded order."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    by_label: dict = {}
    for i in order:
        by_label.setdefault(labels[i], []).append(int(i))
    picked: list[int] = []
    while len(picked) < min(n, len(labels)):
        for lst in by_label.values():
            if lst and len(picked) < n:
                picked.append(lst.pop())
    return picked
