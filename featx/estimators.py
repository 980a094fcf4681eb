"""scikit-learn estimators: ``FeatXEmbedder`` (transformer) and ``FeatXClassifier``.

Both take images, not a feature matrix: a sequence of image paths, a uint8
array ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)``, or a list of uint8
``(H, W[, 3])`` arrays of any size. Images are embedded through the same
embedding store as ``featx extract``, so a path or array embedded once (by the
CLI or by another estimator, e.g. a GridSearchCV clone) is never run again.

>>> from featx import FeatXClassifier
>>> clf = FeatXClassifier(C=1.0).fit(train_paths, y_train)       # doctest: +SKIP
>>> clf.predict(test_paths)                                       # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

from featx.backbones.cards import DEFAULT_BACKBONE
from featx.errors import FeatXError


class ImageInputError(FeatXError, ValueError):
    """Input that is not a batch of images (a ValueError, as sklearn expects)."""


def _as_images(X, who: str) -> tuple[str, Sequence]:
    """Classify the input: ("paths", list[str]) or ("arrays", sequence of uint8 arrays)."""
    if isinstance(X, (str, os.PathLike)):
        raise ImageInputError(f"{who} takes a sequence of images, got a single path {X!r}; "
                              "wrap it in a list")
    if hasattr(X, "toarray") and hasattr(X, "nnz"):  # scipy.sparse
        raise ImageInputError(f"{who} takes images; sparse input is not supported")
    if hasattr(X, "to_numpy") and not isinstance(X, np.ndarray):  # pandas Series / one-column frame
        X = X.to_numpy()
        if X.ndim == 2 and X.shape[1] == 1 and X.dtype == object:
            X = X[:, 0]
    if isinstance(X, np.ndarray):
        if X.dtype == np.uint8 and X.ndim in (3, 4) and (X.ndim == 3 or X.shape[3] in (1, 3, 4)):
            if len(X) == 0:
                raise ImageInputError(f"{who} got 0 images; need at least 1")
            return "arrays", X
        if X.ndim == 1 and X.dtype.kind in "OU":
            X = X.tolist()
        else:
            raise ImageInputError(
                f"{who} takes images: image paths, or uint8 arrays shaped (N, H, W) or "
                f"(N, H, W, 3); got a {X.dtype} array of shape {X.shape}. To fit on "
                "precomputed embeddings use featx.heads.fit.fit_head or a plain sklearn estimator.")
    if not isinstance(X, Sequence) or isinstance(X, bytes):
        raise ImageInputError(f"{who} takes a sequence of image paths or uint8 arrays, "
                              f"got {type(X).__name__}")
    if len(X) == 0:
        raise ImageInputError(f"{who} got 0 images; need at least 1")
    if all(isinstance(x, (str, os.PathLike)) for x in X):
        return "paths", [os.fspath(x) for x in X]
    if all(isinstance(x, np.ndarray) and x.dtype == np.uint8 for x in X):
        return "arrays", list(X)
    kinds = sorted({type(x).__name__ for x in X})
    raise ImageInputError(f"{who} takes image paths or uint8 image arrays, all of one kind; "
                          f"got elements of type {', '.join(kinds)}")


def embed_images(X, backbone, *, device: str = "auto", store=None, batch_size: int = 32,
                 workers: int | None = None, who: str = "FeatXEmbedder", features: str | None = None,
                 crop: str | None = None) -> np.ndarray:
    """Embeddings (N, dim) float32 of a batch of images, in input order, via the shared cache."""
    from featx.backbones.resolve import resolve_backbone
    from featx.predict import embed_arrays, embed_paths

    kind, items = _as_images(X, who)
    bb = resolve_backbone(backbone, features=features, crop=crop)
    if kind == "arrays":
        return embed_arrays(items, bb, device=device, store=store, batch_size=batch_size)
    E, _, failures = embed_paths(list(items), bb, device=device, store=store,
                                  batch_size=batch_size, workers=workers)
    if failures:
        shown = "; ".join(f"{p}: {why}" for p, why in failures[:3])
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        raise FeatXError(f"{len(failures)} of {len(items)} images could not be read: {shown}{more}. "
                         "Remove them from the input (an estimator must return one row per image).")
    return E


class FeatXEmbedder(TransformerMixin, BaseEstimator):
    """Images -> embeddings of a frozen backbone (float32, N x dim).

    Stateless: there is nothing to learn, so ``transform`` works without ``fit``
    (``fit`` only validates its input). The ONNX session is opened on first use,
    shared per process, and never pickled.

    Parameters
    ----------
    backbone : str
        Card name (``featx models``), export/run directory, or ONNX file.
    features : {"last", "multi"} or None
        A card's embedding: the last layer (None: the backbone's own, ``last`` for a card)
        or ``multi``, every stage pooled (wider; better on data unlike ImageNet).
    crop : {"center", "none"} or None
        A card's preprocessing: its centre crop (None: the backbone's own) or the whole image.
    device : {"auto", "cpu", "cuda"}
    store : str or None
        Embedding cache directory (default: ``$FEATX_HOME/store``, shared with the CLI).
    batch_size, workers : int
        Inference batch size; decoding threads (default: CPU count).
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, *, features: str | None = None, crop: str | None = None,
                 device: str = "auto", store: str | None = None, batch_size: int = 32,
                 workers: int | None = None) -> None:
        self.backbone = backbone
        self.features = features
        self.crop = crop
        self.device = device
        self.store = store
        self.batch_size = batch_size
        self.workers = workers

    def fit(self, X, y=None):
        """Validate ``X`` (no learning: the backbone is frozen); returns self."""
        _as_images(X, type(self).__name__)
        return self

    def transform(self, X) -> np.ndarray:
        """Embeddings (N, dim) float32, in input order."""
        return embed_images(X, self.backbone, device=self.device, store=self.store,
                            batch_size=self.batch_size, workers=self.workers,
                            who=type(self).__name__, features=self.features, crop=self.crop)

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        from featx.backbones.resolve import resolve_backbone

        dim = resolve_backbone(self.backbone, features=self.features, crop=self.crop).dim
        return np.asarray([f"embedding{i}" for i in range(dim)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False  # a frozen extractor: like FunctionTransformer
        tags.input_tags.string = True  # image paths
        tags.transformer_tags.preserves_dtype = []  # always float32 out, whatever comes in
        return tags


class FeatXClassifier(ClassifierMixin, BaseEstimator):
    """A frozen backbone + a featx head (scaler + logreg / linear SVM / RBF SVM) on images.

    ``fit`` embeds the images (through the shared cache) and calls
    ``featx.heads.fit.fit_head``; ``C="auto"`` picks C by stratified CV. Fitted
    attributes: ``classes_``, ``pipeline_`` (the sklearn head on embeddings),
    ``report_`` (C, CV score and spread, class counts), ``backbone_fingerprint_``.

    Parameters
    ----------
    backbone : str
        Card name, export/run directory, or ONNX file.
    head : {"logreg", "linear-svm", "svm-rbf"}
    C : float or "auto"
    class_weight : None, "balanced" or dict
    cv : int
        Folds for ``C="auto"``.
    seed : int
    features, crop, device, store, batch_size, workers
        As for ``FeatXEmbedder``.
    finetune : bool
        Fine-tune the backbone card's top blocks (LP-FT, ``featx.finetune``)
        instead of fitting a head on frozen embeddings; ``head``/``C`` are then
        unused and the fitted model is the run's backbone + linear layer.
    finetune_options : dict or None
        ``FinetuneConfig`` fields, e.g. ``{"unfreeze": 2, "epochs": 5}``.
    run_dir : str or None
        Where the fine-tuning run is written (default: a new directory under
        ``$FEATX_HOME/runs``); ``run_dir_`` holds the one used.
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, head: str = "logreg",
                 C: float | str = "auto", *, class_weight: str | dict | None = None, cv: int = 5,
                 seed: int = 0, features: str | None = None, crop: str | None = None, device: str = "auto",
                 store: str | None = None, batch_size: int = 32, workers: int | None = None,
                 finetune: bool = False, finetune_options: dict | None = None, run_dir: str | None = None) -> None:
        self.backbone = backbone
        self.features = features
        self.crop = crop
        self.head = head
        self.C = C
        self.class_weight = class_weight
        self.cv = cv
        self.seed = seed
        self.device = device
        self.store = store
        self.batch_size = batch_size
        self.workers = workers
        self.finetune = finetune
        self.finetune_options = finetune_options
        self.run_dir = run_dir

    def _fitted_backbone(self):
        # a fine-tuned classifier embeds with its own backbone, not the card it started from
        return getattr(self, "backbone_dir_", None) or self.backbone

    def _variant(self) -> dict:
        """features/crop choose among a card's exports; a fine-tuned run's backbone is its own."""
        return {} if getattr(self, "backbone_dir_", None) else {"features": self.features, "crop": self.crop}

    def _resolve(self):
        from featx.backbones.resolve import resolve_backbone

        return resolve_backbone(self._fitted_backbone(), **self._variant())

    def _embed(self, X) -> np.ndarray:
        return embed_images(X, self._fitted_backbone(), device=self.device, store=self.store,
                            batch_size=self.batch_size, workers=self.workers,
                            who=type(self).__name__, **self._variant())

    def fit(self, X, y):
        """Embed ``X`` and fit the head on labels ``y``; returns self."""
        from featx.heads.fit import fit_head

        if y is None:
            raise ImageInputError(f"{type(self).__name__} requires y to be passed, but the target y is None")
        y = np.asarray(y)
        if y.ndim != 1:
            raise ImageInputError(f"y must be one-dimensional, got shape {y.shape}")
        check_classification_targets(y)
        classes, codes = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ImageInputError(f"need images of at least 2 classes; y has only one class, "
                                  f"{classes.tolist()}")
        kind, items = _as_images(X, type(self).__name__)
        if len(items) != len(y):
            raise ImageInputError(f"{len(items)} images but {len(y)} labels")
        for attr in ("backbone_dir_", "run_dir_"):  # a refit starts from the card again
            self.__dict__.pop(attr, None)
        if self.finetune:
            if self.features not in (None, "last") or self.crop not in (None, "center"):
                raise ImageInputError("finetune=True trains the card's own last-layer embedding on its "
                                      "own crop; features= and crop= are for frozen heads")
            return self._fit_finetune(kind, items, classes, codes)
        E = self._embed(X)
        # the head learns codes 0..K-1: column j of predict_proba is classes_[j]
        pipe, report = fit_head(E, codes, head=self.head, C=self.C,
                                class_weight=self.class_weight, cv=self.cv, seed=self.seed)
        report["classes"] = [str(c) for c in classes]
        self.classes_ = classes
        self.pipeline_ = pipe
        self.report_ = report
        self.backbone_fingerprint_ = self._resolve().fingerprint
        return self

    def _fit_finetune(self, kind: str, items, classes: np.ndarray, codes: np.ndarray):
        """LP-FT through featx.finetune; the run's head becomes ``pipeline_``."""
        import tempfile

        from featx.finetune import finetune
        from featx.heads.headfile import load_head
        from featx.paths import home

        # zero-padded codes sort like classes_, so the run's class j is classes_[j]
        names = [f"{int(c):06d}" for c in codes]
        data = (list(items), names) if kind == "paths" else ([np.asarray(a) for a in items], names)
        out = self.run_dir
        if out is None:
            (home() / "runs").mkdir(parents=True, exist_ok=True)
            out = tempfile.mkdtemp(prefix="estimator-", dir=home() / "runs")
        opts = {"seed": self.seed, "batch_size": self.batch_size, **(self.finetune_options or {})}
        run = finetune(data, out=out, device=self.device, store=self.store, backbone=self.backbone,
                       **opts)
        head = load_head(run.head_path)
        if head.classes != sorted(set(names)):
            raise ImageInputError(f"fine-tuning returned classes {head.classes}, expected {len(classes)}")
        self.classes_ = classes
        self.pipeline_ = head.pipeline
        self.report_ = {**run.summary, "classes": [str(c) for c in classes], "finetune": True}
        self.run_dir_ = str(run.run_dir)
        self.backbone_dir_ = str(run.backbone.onnx_path.parent)
        self.backbone_fingerprint_ = run.backbone.fingerprint
        return self

    def _embed_fitted(self, X) -> np.ndarray:
        from featx.errors import MismatchError

        check_is_fitted(self)
        fp = self._resolve().fingerprint
        if fp != self.backbone_fingerprint_:
            raise MismatchError(f"this classifier was fitted on backbone fingerprint "
                                f"{self.backbone_fingerprint_}, but backbone={self.backbone!r} is now "
                                f"{fp}; refit it")
        return self._embed(X)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (N, n_classes), columns in ``classes_`` order."""
        from featx.heads.fit import one_blas_thread

        check_is_fitted(self)
        E = self._embed_fitted(X)
        with one_blas_thread():
            return self.pipeline_.predict_proba(E)

    def predict(self, X) -> np.ndarray:
        """The class with the highest probability (as ``featx predict`` and the ONNX file)."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def predict_log_proba(self, X) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def decision_function(self, X) -> np.ndarray:
        """Scores, (N,) for two classes, else (N, n_classes).

        The logreg head gives its linear decision function; the calibrated SVM heads
        give log-probabilities (log-odds of ``classes_[1]`` for two classes), whose
        ordering matches ``predict_proba``.
        """
        from featx.heads.fit import one_blas_thread

        check_is_fitted(self)
        E = self._embed_fitted(X)
        with one_blas_thread():
            last = self.pipeline_[-1] if hasattr(self.pipeline_, "steps") else self.pipeline_
            if hasattr(last, "decision_function"):
                return self.pipeline_.decision_function(E)
            p = np.clip(self.pipeline_.predict_proba(E), 1e-15, 1.0)
        if p.shape[1] == 2:
            return np.log(p[:, 1]) - np.log(p[:, 0])
        return np.log(p)

    def save_head(self, path: str | os.PathLike):
        """Write a featx head file, usable by ``featx predict/evaluate/export-classifier``."""
        from featx.heads.headfile import save_head

        check_is_fitted(self)
        bb = self._resolve()
        return save_head(path, self.pipeline_, [str(c) for c in self.classes_], bb, self.report_)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.string = True  # image paths
        return tags
