"""A head's probabilities, with its columns named by class."""

from __future__ import annotations

import numpy as np

from featx.errors import FeatXError
from featx.heads.fit import one_blas_thread
from featx.heads.headfile import Head


def head_class_columns(head: Head) -> list[str]:
    """Class name of each ``predict_proba`` column (heads are trained on codes 0..K-1,
    but a pipeline built elsewhere may carry the names themselves)."""
    cls = getattr(head.pipeline, "classes_", None)
    if cls is None:
        return list(head.classes)
    out = []
    for c in np.asarray(cls).tolist():
        if isinstance(c, (int, np.integer)) and 0 <= int(c) < len(head.classes):
            out.append(head.classes[int(c)])
        else:
            out.append(str(c))
    return out


def head_proba(head: Head, X: np.ndarray) -> np.ndarray:
    """Probabilities (N, K) with columns in ``head_class_columns`` order."""
    if X.shape[1:] != (head.meta.get("backbone", {}).get("dim", X.shape[1]),):
        raise FeatXError(f"embeddings have dim {X.shape[1]}, the head expects "
                         f"{head.meta['backbone']['dim']}")
    if len(X) == 0:
        return np.zeros((0, len(head_class_columns(head))))
    with one_blas_thread():
        return np.asarray(head.pipeline.predict_proba(X), dtype=np.float64)
