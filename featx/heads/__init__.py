"""Heads: classifiers trained on embeddings, the head file, and the one-file ONNX classifier.

``kinds`` (the one list of head kinds), ``fit`` (scaler + logistic regression / SVM,
C by cross-validation), ``streaming``
(SGD over a table larger than memory), ``headfile`` (save/load, with the backbone
fingerprint it belongs to), ``codec`` (a fitted head as arrays + JSON: head files hold
no pickle), ``onnx_classifier`` (backbone + head as one ONNX file).
"""

from __future__ import annotations

from featx._lazy import lazy_exports

_EXPORTS = {
    "HEAD_KINDS": "featx.heads.kinds",
    "fit_head": "featx.heads.fit",
    "make_head": "featx.heads.fit",
    "fit_streaming_head": "featx.heads.streaming",
    "Head": "featx.heads.headfile",
    "save_head": "featx.heads.headfile",
    "load_head": "featx.heads.headfile",
    "export_classifier": "featx.heads.onnx_classifier",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
