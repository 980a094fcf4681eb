"""featx: transfer learning for images.

A pretrained CNN exported to ONNX runs frozen as a feature extractor, its
embeddings are cached, and a scikit-learn head is trained on them. The public
API is listed in ``__all__`` (and docs/api.md); names are imported on first use,
so ``import featx`` stays cheap. The jobs live in modules named for them
(``featx.extract.extract``, ``featx.predict.predict``, ``featx.evaluate.evaluate``,
``featx.compare.compare``, ``featx.finetune.finetune``): a top-level function of the
same name would be replaced by its module as soon as the module is imported.
"""

from __future__ import annotations

from featx._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "FeatXClassifier": "featx.estimators",
    "FeatXEmbedder": "featx.estimators",
    "resolve_backbone": "featx.backbones.resolve",
    "fit_head": "featx.heads.fit",
    "save_head": "featx.heads.headfile",
    "load_head": "featx.heads.headfile",
    "read_table": "featx.embed.table",
    "FeatXError": "featx.errors",
}
__all__ = [*sorted(_EXPORTS), "__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
