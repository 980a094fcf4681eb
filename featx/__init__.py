"""featx: transfer learning for images.

A pretrained CNN exported to ONNX runs frozen as a feature extractor, its
embeddings are cached, and a scikit-learn head is trained on them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["FeatXClassifier", "FeatXEmbedder", "__version__"]


def __getattr__(name: str):
    # estimators import sklearn and onnxruntime; keep `import featx` cheap
    if name in ("FeatXClassifier", "FeatXEmbedder"):
        from . import estimators

        return getattr(estimators, name)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
