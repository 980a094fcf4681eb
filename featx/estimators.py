"""scikit-learn estimators: ``FeatXEmbedder`` (transformer) and ``FeatXClassifier``.

Both take images, not a feature matrix: a sequence of image paths, a list of PIL
images, a uint8 array ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)``, or a list of
uint8 ``(H, W[, 3])`` arrays of any size. Images are embedded through the same
embedding store as ``featx extract``, so a path or array embedded once (by the
CLI or by another estimator, e.g. a GridSearchCV clone) is never run again.

>>> from featx import FeatXClassifier
>>> clf = FeatXClassifier(C=1.0).fit(train_paths, y_train)       # doctest: +SKIP
>>> clf.predict(test_paths)                                       # doctest: +SKIP
"""

from __future__ import annotations

import logging
import numbers
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

from featx.backbones.cards import DEFAULT_BACKBONE
from featx.errors import FeatXError
from featx.progress import LogProgress, ProgressFn, Watch, no_progress

log = logging.getLogger(__name__)

__all__ = ["FeatXClassifier", "FeatXEmbedder", "ImageInputError", "embed_images"]

# sklearn's way of renaming a parameter: the old name stays for a while with this default
DEPRECATED = "deprecated"


class ImageInputError(FeatXError, ValueError):
    """Input that is not a batch of images (a ValueError, as sklearn expects)."""


def _is_pil(x) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image)


def _check_paths(paths: list[str], who: str) -> None:
    """Refuse paths that name no file before any work: a typo, not a file that vanished."""
    missing = [p for p in paths if not os.path.exists(p)]
    dirs = [p for p in paths if os.path.isdir(p)]
    if not missing and not dirs:
        return
    bad, what = (missing, "no such file") if missing else (dirs, "a folder, not an image file")
    shown = ", ".join(repr(p) for p in bad[:3]) + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else "")
    where = (f"; relative paths are read from the current folder, {os.getcwd()}"
             if any(not os.path.isabs(p) for p in bad) else "")
    raise ImageInputError(f"{who}: {what}: {shown}{where}" if len(bad) == 1 else
                          f"{who}: {len(bad)} of {len(paths)} paths are {what}: {shown}{where}")


def _as_images(X, who: str) -> tuple[str, Sequence]:
    """Classify the input: ("paths", list[str]), ("arrays", uint8 arrays) or ("pil", images)."""
    if isinstance(X, (str, os.PathLike)):
        raise ImageInputError(f"{who} takes a sequence of images, got a single path {X!r}; "
                              "wrap it in a list")
    if _is_pil(X):
        raise ImageInputError(f"{who} takes a sequence of images, got a single PIL image; "
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
                f"{who} takes images: image paths, PIL images, or uint8 arrays shaped (N, H, W) "
                f"or (N, H, W, 3); got a {X.dtype} array of shape {X.shape}. To fit on "
                "precomputed embeddings use featx.heads.fit.fit_head or a plain sklearn estimator.")
    if not isinstance(X, Sequence) or isinstance(X, bytes):
        raise ImageInputError(f"{who} takes a sequence of image paths, PIL images or uint8 arrays, "
                              f"got {type(X).__name__}")
    if len(X) == 0:
        raise ImageInputError(f"{who} got 0 images; need at least 1")
    if all(isinstance(x, (str, os.PathLike)) for x in X):
        paths = [os.fspath(x) for x in X]
        _check_paths(paths, who)
        return "paths", paths
    if all(isinstance(x, np.ndarray) and x.dtype == np.uint8 for x in X):
        return "arrays", list(X)
    if all(_is_pil(x) or (isinstance(x, np.ndarray) and x.dtype == np.uint8) for x in X):
        return "pil", list(X)
    kinds = sorted({type(x).__name__ for x in X})
    raise ImageInputError(f"{who} takes image paths, PIL images or uint8 image arrays, not mixed "
                          f"with other things; got elements of type {', '.join(kinds)}")


def _pil_pixels(images: list) -> list[np.ndarray]:
    """PIL images as uint8 RGB arrays, converted exactly as featx's loader converts them."""
    # featx.embed.images.to_rgb is the loader's own mode conversion (transparency on white,
    # 16-bit scaled, CMYK, palette): one definition, so a PIL image and the same file agree
    from featx.embed.images import to_rgb

    return [np.asarray(to_rgb(x)) if _is_pil(x) else x for x in images]


def n_jobs_threads(n_jobs: int | None) -> int | None:
    """Decoding threads for ``n_jobs`` (joblib's convention; None means every core).

    Unlike most scikit-learn estimators, where ``None`` means one job, featx decodes
    with every core by default, as its CLI does (threads, not processes: cheap).
    """
    if n_jobs is None:
        return None
    if not isinstance(n_jobs, numbers.Integral) or isinstance(n_jobs, bool) or n_jobs == 0:
        raise ImageInputError(f"n_jobs must be a non-zero integer or None, got {n_jobs!r}")
    if n_jobs < 0:  # -1: all cores, -2: all but one, ...
        return max(1, (os.cpu_count() or 1) + 1 + int(n_jobs))
    return int(n_jobs)


def seed_from(random_state) -> int:
    """An int seed for featx's heads: an int as given (as ``--seed``), else drawn from it."""
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        return int(random_state)
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def _renamed(est, old: str, new: str, default):
    """The value of parameter ``new``, or of its deprecated old name ``old`` (with a warning)."""
    value_old, value_new = getattr(est, old), getattr(est, new)
    if isinstance(value_old, str) and value_old == DEPRECATED:
        return value_new
    if value_new is not default and value_new != default:
        raise ImageInputError(f"{type(est).__name__}: pass {new}= only ({old}= is its old name), "
                              f"got {old}={value_old!r} and {new}={value_new!r}")
    warnings.warn(f"{type(est).__name__}({old}=...) was renamed {new}= (scikit-learn's name) and "
                  f"will be removed in a future release; use {type(est).__name__}({new}={value_old!r})",
                  FutureWarning, stacklevel=3)
    return value_old


def progress_of(verbose, who: str) -> Watch:
    """The progress callback of an estimator call: ``verbose`` 0 reports nothing, 1 logs
    a line per stage and at most one every 10 s, 2 or more logs every report (featx's
    log, logger ``featx.estimators`` at INFO: library code never prints)."""
    if isinstance(verbose, bool) or not isinstance(verbose, numbers.Integral) or verbose < 0:
        raise ImageInputError(f"verbose must be an integer >= 0, got {verbose!r}")
    if verbose == 0:
        return Watch()
    return Watch(LogProgress(log, every=10.0 if verbose == 1 else 0.0, prefix=f"{who}: "))


def interrupted_message(call: str, watch: Watch, fitting: bool = False) -> str:
    """What Ctrl-C in an estimator's ``call`` left behind, from the last progress it reported."""
    stage = watch.last[0] if watch.last else None
    embed = watch.seen.get("embed")
    if embed is not None and stage == "embed" and embed[0] < embed[1]:
        done, total = embed
        said = (f"{call} interrupted while embedding: {done} of the {total} images not cached before "
                "are in the embedding store (the others were cached already); the same call "
                "again embeds only the rest")
    elif embed is not None or stage in ("choose C", "fit"):
        said = (f"{call} interrupted after embedding: every image's embedding is in the embedding "
                "store; the same call again starts from them")
    elif stage is not None and stage.split(" ")[0] in ("epoch", "validate", "lp-init", "model", "check", "export"):
        said = f"{call} interrupted while fine-tuning; the run directory keeps its last checkpoint"
    elif stage == "hash":
        said = f"{call} interrupted while reading the image files; nothing new was embedded"
    else:
        said = (f"{call} interrupted before any image was embedded (the first use of a backbone "
                "exports it to ONNX)")
    if fitting:
        said += "; the estimator was not changed (a previous fit, if any, is kept)"
    return said + "."


@contextmanager
def interruptible(call: str, watch: Watch, fitting: bool = False) -> Iterator[None]:
    """Ctrl-C inside the block becomes one KeyboardInterrupt that says what was kept."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_message(call, watch, fitting)) from None


def embed_images(X, backbone, *, device: str = "auto", store=None, batch_size: int = 32,
                 workers: int | None = None, who: str = "FeatXEmbedder",
                 features: str | None = None, crop: str | None = None,
                 progress: ProgressFn = no_progress) -> np.ndarray:
    """Embeddings of a batch of images, in input order, via the shared cache.

    Parameters
    ----------
    X : sequence of image paths, list of PIL images, or uint8 arrays
        As the estimators take them (see the module docstring).
    backbone : str, path or Backbone
        Card name, export or run directory, or ONNX file.
    device : {"auto", "cpu", "cuda"}
    store : str or None
        Embedding cache directory (default ``$FEATX_HOME/store``).
    batch_size : int
        Images per ONNX Runtime call.
    workers : int or None
        Decoding threads for paths (default: every core).
    who : str
        Name used in error messages.
    features, crop : str or None
        Which export of a card (``"last"``/``"multi"``, ``"center"``/``"none"``); None: for a
        card, ``featx extract``'s default (multi, ``featx.backbones.features.DEFAULT_FEATURES``),
        for an export directory or ONNX file its own.
    progress : callable
        A ``featx.progress`` callback: "backbone", then "hash" (paths only) and "embed"
        (the images not in the store yet, as they are stored).

    Returns
    -------
    ndarray of shape (N, dim), float32
        One row per image. An unreadable image raises (naming it): an estimator
        must return one row per input.
    """
    from featx.backbones.resolve import card_features, resolve_backbone
    from featx.engines.files import embed_arrays, embed_paths

    kind, items = _as_images(X, who)
    progress("backbone", 0, 0)
    bb = resolve_backbone(backbone, features=card_features(backbone, features), crop=crop)
    if kind != "paths":
        pixels = _pil_pixels(items) if kind == "pil" else items
        return embed_arrays(pixels, bb, device=device, store=store, batch_size=batch_size,
                            progress=progress)
    E, _, failures = embed_paths(list(items), bb, device=device, store=store,
                                  batch_size=batch_size, workers=workers, progress=progress)
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
    shared per process, and never pickled. Embeddings go through the same store
    as ``featx extract``: an image embedded once is not run again.

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        Card name (``featx models``), export or fine-tuning run directory, or ONNX file.
    features : {"last", "multi"} or None, default=None
        A card's embedding: ``multi``, every stage pooled (None means ``featx extract``'s
        default, multi, so the CLI's cached embeddings are shared), or ``last``, the last
        layer's average (4x narrower). An export directory or ONNX file gives its own.
    crop : {"center", "none"} or None, default=None
        A card's preprocessing: its centre crop (None: the backbone's own) or the whole image.
    device : {"auto", "cpu", "cuda"}, default="auto"
        ``auto`` uses CUDA when ONNX Runtime has it; an explicit ``cuda`` that cannot
        be honoured raises.
    store : str or None, default=None
        Embedding cache directory (default ``$FEATX_HOME/store``, shared with the CLI).
    batch_size : int, default=32
        Images per ONNX Runtime call.
    n_jobs : int or None, default=None
        Threads that read and decode image files. None or -1: every core (featx's
        default, unlike scikit-learn's one job); -2: all but one; arrays and PIL
        images are already decoded and do not use them.
    verbose : int, default=0
        Progress of ``transform``: 0 none; 1 a log line per stage ("embed 96/300 (32%),
        25.1/s, ETA 8 s") and at most one every 10 s; 2 every batch. Lines go to the
        ``featx.estimators`` logger at INFO (``logging.basicConfig(level="INFO")`` shows them).
    workers : int, deprecated
        Old name of ``n_jobs``; still works, with a FutureWarning.

    Ctrl-C during ``transform`` raises a KeyboardInterrupt that says how many images were
    embedded; they stay in the store, so the same call again embeds only the rest.

    Examples
    --------
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.pipeline import make_pipeline
    >>> from featx import FeatXEmbedder
    >>> E = FeatXEmbedder().transform(["cat.jpg", "dog.jpg"])   # doctest: +SKIP
    >>> E.shape                                                 # doctest: +SKIP
    (2, 4880)
    >>> make_pipeline(FeatXEmbedder(), LogisticRegression()).fit(paths, y)  # doctest: +SKIP
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, *, features: str | None = None,
                 crop: str | None = None, device: str = "auto",
                 store: str | None = None, batch_size: int = 32, n_jobs: int | None = None,
                 verbose: int = 0, workers: int | str | None = DEPRECATED) -> None:
        self.backbone = backbone
        self.features = features
        self.crop = crop
        self.device = device
        self.store = store
        self.batch_size = batch_size
        self.n_jobs = n_jobs
        self.verbose = verbose
        self.workers = workers

    def _threads(self) -> int | None:
        return n_jobs_threads(_renamed(self, "workers", "n_jobs", None))

    def fit(self, X, y=None):
        """Validate ``X``; nothing is learned (the backbone is frozen).

        Parameters
        ----------
        X : sequence of image paths, list of PIL images, or uint8 array(s)
        y : ignored

        Returns
        -------
        self
        """
        _as_images(X, type(self).__name__)
        self._threads()
        return self

    def transform(self, X) -> np.ndarray:
        """Embed the images.

        Parameters
        ----------
        X : sequence of image paths, list of PIL images, or uint8 array(s)

        Returns
        -------
        ndarray of shape (n_images, dim), float32
            In input order. An unreadable file raises, naming it.
        """
        who = type(self).__name__
        watch = progress_of(self.verbose, who)
        with interruptible(f"{who}.transform", watch):
            return embed_images(X, self.backbone, device=self.device, store=self.store,
                                batch_size=self.batch_size, workers=self._threads(), who=who,
                                features=self.features, crop=self.crop, progress=watch)

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """``embedding0`` .. ``embedding{dim-1}``, as in a Pipeline's ``set_output``."""
        from featx.backbones.resolve import card_features, resolve_backbone

        dim = resolve_backbone(self.backbone, features=card_features(self.backbone, self.features),
                               crop=self.crop).dim
        return np.asarray([f"embedding{i}" for i in range(dim)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False  # a frozen extractor: like FunctionTransformer
        tags.input_tags.string = True  # image paths
        tags.transformer_tags.preserves_dtype = []  # always float32 out, whatever comes in
        return tags


def _sample_weight(sample_weight, n: int) -> np.ndarray | None:
    """``sample_weight`` as a float array of ``n`` finite, non-negative weights (not all 0), or None."""
    if sample_weight is None:
        return None
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.ndim == 0:
        w = np.full(n, float(w))
    if w.shape != (n,):
        raise ImageInputError(f"sample_weight.shape == {w.shape}, expected ({n},): one weight per image")
    if not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise ImageInputError("sample_weight must be finite, non-negative and not all zero")
    return w


def _refit_weighted(pipe, E: np.ndarray, codes: np.ndarray, w: np.ndarray) -> None:
    """Refit ``pipe`` (at its chosen C) with per-row weights: the scaler's statistics and the loss."""
    from sklearn.preprocessing import StandardScaler

    params = {f"{pipe.steps[-1][0]}__sample_weight": w}
    if isinstance(pipe.steps[0][1], StandardScaler):
        params[f"{pipe.steps[0][0]}__sample_weight"] = w
    pipe.fit(E, codes, **params)


class FeatXClassifier(ClassifierMixin, BaseEstimator):
    """A frozen backbone + a featx head (scaler + logreg / linear SVM / RBF SVM) on images.

    ``fit`` embeds the images (through the shared cache) and calls
    ``featx.heads.fit.fit_head``, exactly what ``featx fit-head`` does on a table;
    ``C="auto"`` picks C by stratified cross-validation. With ``finetune=True`` it
    runs LP-FT fine-tuning instead (``featx.finetune``).

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        Card name, export or fine-tuning run directory, or ONNX file.
    head : {"logreg", "linear-svm", "svm-rbf"}, default="logreg"
        Classifier on the scaled embeddings (see docs/heads.md).
    C : float or "auto", default="auto"
        Inverse regularisation; ``"auto"`` chooses it by stratified CV over a log grid.
    class_weight : None, "balanced" or dict, default=None
    cv : int or None, default=None
        Folds for ``C="auto"``: None is 5, or 3 from 6,000 CV rows on (fewer when the
        smallest class is smaller).
    random_state : int, RandomState instance or None, default=0
        Seeds the CV splits, the solvers and fine-tuning. An int is used as given
        (the same as ``featx fit-head --seed``); None draws a fresh seed per fit.
    features, crop : str or None, default=None
        As for ``FeatXEmbedder``: which export of a card to embed with (None: multi, as
        ``featx extract``).
    segment : {"auto", "all", "last"}, default="auto"
        On a multi embedding, the columns a logreg head uses: the whole vector, or its
        last segment (the backbone's own pooled output); ``"auto"`` (with ``C="auto"``)
        scores both by the same CV and keeps the better, exactly as ``featx fit-head
        --segment`` (``featx.heads.segment.choose_segment``).
    device : {"auto", "cpu", "cuda"}, default="auto"
    store : str or None, default=None
        Embedding cache directory (default ``$FEATX_HOME/store``, shared with the CLI).
    batch_size : int, default=32
        Images per ONNX Runtime call (and per fine-tuning step).
    n_jobs : int or None, default=None
        Threads that read and decode image files; None or -1: every core.
    finetune : bool, default=False
        Fine-tune the backbone card's top blocks (LP-FT) instead of fitting a head on
        frozen embeddings; ``head``/``C`` are then unused and the fitted model is the
        run's backbone + linear layer.
    finetune_options : dict or None, default=None
        ``FinetuneConfig`` fields, e.g. ``{"unfreeze": 2, "epochs": 5}``.
    run_dir : str or None, default=None
        Where the fine-tuning run is written (default: a new directory under
        ``$FEATX_HOME/runs``).
    verbose : int, default=0
        Progress of ``fit`` and prediction: 0 none; 1 a log line per stage (embed, choose C,
        epochs) and at most one every 10 s, with rate and ETA; 2 every report. Lines go to
        the ``featx.estimators`` logger at INFO (``logging.basicConfig(level="INFO")``).
    seed : int, deprecated
        Old name of ``random_state``; still works, with a FutureWarning.
    workers : int, deprecated
        Old name of ``n_jobs``; still works, with a FutureWarning.

    Ctrl-C during ``fit`` or a prediction raises a KeyboardInterrupt that says how far it
    got: the images embedded so far stay in the store (the same call again embeds only the
    rest), and an interrupted ``fit`` leaves the estimator as it was.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels, in the order of ``predict_proba``'s columns.
    pipeline_ : sklearn Pipeline
        The fitted head on embeddings (scaler + classifier).
    report_ : dict
        C, CV score and spread, calibration (temperature), class counts, training accuracy.
    novelty_ : featx.heads.novelty.Novelty or None
        The training-embedding sample behind ``is_unknown`` / ``novelty_score``.
    conformal_ : featx.heads.conformal.Conformal or None
        The out-of-fold conformity scores behind ``predict_sets`` (C="auto", logreg).
    backbone_fingerprint_ : str
        Fingerprint of the backbone the head was fitted on; predicting with another
        backbone raises ``featx.errors.MismatchError``.
    run_dir_, backbone_dir_ : str
        Only with ``finetune=True``: the run directory and its exported backbone.

    Examples
    --------
    >>> from featx import FeatXClassifier
    >>> clf = FeatXClassifier(C="auto").fit(["a/1.jpg", "b/1.jpg", ...], ["a", "b", ...])  # doctest: +SKIP
    >>> clf.predict(["new.jpg"])                                # doctest: +SKIP
    array(['a'], dtype='<U1')
    >>> clf.save_head("head.featx")    # for featx predict / evaluate  # doctest: +SKIP
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, head: str = "logreg",
                 C: float | str = "auto", *, class_weight: str | dict | None = None, cv: int | None = None,
                 random_state=0, features: str | None = None, crop: str | None = None,
                 segment: str = "auto", device: str = "auto", store: str | None = None,
                 batch_size: int = 32, n_jobs: int | None = None, finetune: bool = False,
                 finetune_options: dict | None = None, run_dir: str | None = None, verbose: int = 0,
                 seed: int | str = DEPRECATED, workers: int | str | None = DEPRECATED) -> None:
        self.backbone = backbone
        self.features = features
        self.crop = crop
        self.segment = segment
        self.head = head
        self.C = C
        self.class_weight = class_weight
        self.cv = cv
        self.random_state = random_state
        self.device = device
        self.store = store
        self.batch_size = batch_size
        self.n_jobs = n_jobs
        self.finetune = finetune
        self.finetune_options = finetune_options
        self.run_dir = run_dir
        self.verbose = verbose
        self.seed = seed
        self.workers = workers

    def _fitted_backbone(self):
        # a fine-tuned classifier embeds with its own backbone, not the card it started from
        return getattr(self, "backbone_dir_", None) or self.backbone

    def _threads(self) -> int | None:
        return n_jobs_threads(_renamed(self, "workers", "n_jobs", None))

    def _variant(self) -> dict:
        """features/crop choose among a card's exports; a fine-tuned run's backbone is its own."""
        if getattr(self, "backbone_dir_", None):
            return {}
        from featx.backbones.resolve import card_features

        return {"features": card_features(self.backbone, self.features), "crop": self.crop}

    def _resolve(self):
        from featx.backbones.resolve import resolve_backbone

        return resolve_backbone(self._fitted_backbone(), **self._variant())

    def _embed(self, X, progress: ProgressFn = no_progress) -> np.ndarray:
        return embed_images(X, self._fitted_backbone(), device=self.device, store=self.store,
                            batch_size=self.batch_size, workers=self._threads(),
                            who=type(self).__name__, progress=progress, **self._variant())

    def fit(self, X, y, sample_weight=None):
        """Embed the images and fit the head (or fine-tune) on their labels.

        Parameters
        ----------
        X : sequence of image paths, list of PIL images, or uint8 array(s)
            At least two images of each of at least two classes for ``C="auto"``.
        y : array-like of shape (n_images,)
            Class labels (strings or integers).
        sample_weight : array-like of shape (n_images,), default=None
            Non-negative weight of each image in the head's loss (and the scaler's
            statistics). With ``C="auto"``, C is chosen by the unweighted CV and the head
            is then fitted with the weights. Not for ``finetune=True``.

        Returns
        -------
        self
        """
        from featx.heads.segment import check_segment

        who = type(self).__name__
        if y is None:
            raise ImageInputError(f"{who} requires y to be passed, but the target y is None")
        y = np.asarray(y)
        if y.ndim != 1:
            raise ImageInputError(f"y must be one-dimensional, got shape {y.shape}")
        if len(y) == 0:
            raise ImageInputError(f"{who}.fit got no labels (y is empty); it needs labelled "
                                  "images of at least 2 classes")
        seed = seed_from(_renamed(self, "seed", "random_state", 0))
        self._threads()  # a bad n_jobs fails before any work
        check_classification_targets(y)
        classes, codes = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ImageInputError(f"need images of at least 2 classes; y has only one class, "
                                  f"{classes.tolist()}")
        kind, items = _as_images(X, who)
        if len(items) != len(y):
            raise ImageInputError(f"{len(items)} images but {len(y)} labels")
        weights = _sample_weight(sample_weight, len(y))
        if weights is not None and self.finetune:
            raise ImageInputError("sample_weight is for frozen heads; finetune=True does not take it")
        if self.finetune:
            if self.features not in (None, "last") or self.crop not in (None, "center"):
                raise ImageInputError("finetune=True trains the card's own last-layer embedding on its "
                                      "own crop; features= and crop= are for frozen heads")
        else:
            check_segment(self.segment)
        watch = progress_of(self.verbose, who)
        # a refit starts from the card again; an interrupted or failed one restores them
        kept = {a: self.__dict__.pop(a) for a in ("backbone_dir_", "run_dir_") if a in self.__dict__}
        try:
            with interruptible(f"{who}.fit", watch, fitting=True):
                if self.finetune:
                    return self._fit_finetune(kind, items, classes, codes, seed, watch)
                return self._fit_frozen(X, classes, codes, weights, seed, watch)
        except BaseException:
            self.__dict__.update(kept)
            raise

    def _fit_frozen(self, X, classes: np.ndarray, codes: np.ndarray, weights: np.ndarray | None,
                    seed: int, progress: ProgressFn):
        """Embed, fit the head (on the columns ``segment`` picks), then set the fitted state."""
        from featx.heads.fit import fit_head_full
        from featx.heads.novelty import fit_novelty
        from featx.heads.segment import choose_segment

        E = self._embed(X, progress)
        bb = self._resolve()
        conformal = {}  # id(report) -> that fit's conformal scores

        def fit(cols: np.ndarray) -> tuple[object, dict]:
            # the head learns codes 0..K-1: column j of predict_proba is classes_[j]
            f = fit_head_full(cols, codes, head=self.head, C=self.C, class_weight=self.class_weight,
                              cv=self.cv, seed=seed, progress=progress, novelty=False)
            if weights is not None:
                _refit_weighted(f.pipeline, cols, codes, weights)
                # the refit replaces the temperature that was folded into the weights
                f.report.update(sample_weight=True,
                                train_accuracy=float(np.mean(f.pipeline.predict(cols) == codes)),
                                calibration={"method": "none", "reason": "refitted with sample_weight"})
            conformal[id(f.report)] = f.conformal
            return f.pipeline, f.report

        # fit-head's own choice between the whole multi vector and its last segment
        pipeline, report = choose_segment(E, bb.meta.get("features"), self.head, self.C, self.segment,
                                          fit, bb.name)
        novelty = fit_novelty(E, seed=seed)  # of the whole rows: what predict gives the head
        report["novelty"] = {"method": "knn-cosine", "sample_rows": len(novelty.sample),
                             "quantile": novelty.quantile, "threshold": novelty.threshold()}
        report["classes"] = [str(c) for c in classes]
        # the fitted state is set only here, all at once: an interrupted fit leaves none of it
        self.classes_ = classes
        self.pipeline_ = pipeline
        self.report_ = report
        self.novelty_ = novelty
        # conformal scores come from the unweighted search's out-of-fold probabilities
        self.conformal_ = conformal[id(report)] if weights is None else None
        self.backbone_fingerprint_ = bb.fingerprint
        return self

    def _fit_finetune(self, kind: str, items, classes: np.ndarray, codes: np.ndarray, seed: int,
                      progress: ProgressFn = no_progress):
        """LP-FT through featx.finetune; the run's head becomes ``pipeline_``."""
        import tempfile

        from featx.finetune import finetune
        from featx.heads.headfile import load_head
        from featx.paths import home

        # zero-padded codes sort like classes_, so the run's class j is classes_[j]
        names = [f"{int(c):06d}" for c in codes]
        if kind == "pil":
            items = _pil_pixels(items)
        data = (list(items), names) if kind == "paths" else ([np.asarray(a) for a in items], names)
        out = self.run_dir
        if out is None:
            (home() / "runs").mkdir(parents=True, exist_ok=True)
            out = tempfile.mkdtemp(prefix="estimator-", dir=home() / "runs")
        opts = {"seed": seed, "batch_size": self.batch_size, **(self.finetune_options or {})}
        run = finetune(data, out=out, device=self.device, store=self.store, backbone=self.backbone,
                       progress=progress, **opts)
        head = load_head(run.head_path)
        if head.classes != sorted(set(names)):
            raise ImageInputError(f"fine-tuning returned classes {head.classes}, expected {len(classes)}")
        self.classes_ = classes
        self.pipeline_ = head.pipeline
        self.novelty_, self.conformal_ = head.novelty, head.conformal
        self.report_ = {**run.summary, "classes": [str(c) for c in classes], "finetune": True}
        self.run_dir_ = str(run.run_dir)
        self.backbone_dir_ = str(run.backbone.onnx_path.parent)
        self.backbone_fingerprint_ = run.backbone.fingerprint
        return self

    def _embed_fitted(self, X) -> np.ndarray:
        from featx.backbones.resolve import check_fingerprint

        check_is_fitted(self)
        check_fingerprint(self._resolve(), self.backbone_fingerprint_,
                          "this classifier was fitted on another backbone",
                          f"backbone={self.backbone!r} has changed since fit; refit it")
        who = type(self).__name__
        watch = progress_of(self.verbose, who)
        with interruptible(f"{who} prediction", watch):
            return self._embed(X, watch)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities.

        Parameters
        ----------
        X : sequence of image paths, list of PIL images, or uint8 array(s)

        Returns
        -------
        ndarray of shape (n_images, n_classes)
            Column ``j`` is the probability of ``classes_[j]``; rows sum to 1.
        """
        from featx.heads.fit import one_blas_thread

        check_is_fitted(self)
        E = self._embed_fitted(X)
        with one_blas_thread():
            return self.pipeline_.predict_proba(E)

    def predict(self, X) -> np.ndarray:
        """The class with the highest probability (as ``featx predict`` and the ONNX file).

        Parameters
        ----------
        X : sequence of image paths, list of PIL images, or uint8 array(s)

        Returns
        -------
        ndarray of shape (n_images,)
            Labels from ``classes_``.
        """
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def predict_log_proba(self, X) -> np.ndarray:
        """Natural log of ``predict_proba(X)`` (``-inf`` where a probability is 0)."""
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

    def novelty_score(self, X) -> np.ndarray:
        """Cosine distance of each image's embedding to the nearest stored training embedding.

        Parameters
        ----------
        X : sequence of image paths, list of PIL images, or uint8 array(s)

        Returns
        -------
        ndarray of shape (n_images,)
            Larger is more unlike the training images (``featx.heads.novelty``).
        """
        return self._novelty().score(self._embed_fitted(X))

    def is_unknown(self, X, quantile: float | None = None) -> np.ndarray:
        """True for images unlike anything in training (what ``featx predict`` labels unknown).

        Parameters
        ----------
        X : sequence of image paths, list of PIL images, or uint8 array(s)
        quantile : float or None, default=None
            An image is unknown when its ``novelty_score`` exceeds this quantile of the
            training rows' own (out-of-sample) scores; None: the head's, 0.99.

        Returns
        -------
        ndarray of shape (n_images,), bool
        """
        return self._novelty().is_unknown(self._embed_fitted(X), quantile)

    def predict_sets(self, X, coverage: float = 0.9) -> np.ndarray:
        """Conformal prediction sets (``featx predict --coverage``), from the C search's
        out-of-fold probabilities (needs ``C="auto"``, the logreg head and MAPIE).

        Parameters
        ----------
        X : sequence of image paths, list of PIL images, or uint8 array(s)
        coverage : float, default=0.9
            The share of images like the training ones whose set holds the true class.

        Returns
        -------
        ndarray of shape (n_images, n_classes), bool
            Column ``j`` says whether ``classes_[j]`` is in the image's set.
        """
        from featx.errors import FeatXError

        check_is_fitted(self)
        if getattr(self, "conformal_", None) is None:
            raise FeatXError("this classifier keeps no conformal scores: fit it with C='auto' and "
                             "head='logreg' for prediction sets")
        return self.conformal_.sets(self.predict_proba(X), coverage)

    def _novelty(self):
        from featx.errors import FeatXError

        check_is_fitted(self)
        if getattr(self, "novelty_", None) is None:
            raise FeatXError("this classifier keeps no novelty sample (a fine-tuned run or a head "
                             "from an older featx); refit it")
        return self.novelty_

    def save_head(self, path: str | os.PathLike):
        """Write a featx head file, usable by ``featx predict/evaluate/export-classifier``.

        Parameters
        ----------
        path : str or path-like
            The head file to write (``head.featx``).

        Returns
        -------
        pathlib.Path
            The file written.
        """
        from featx.heads.headfile import save_head

        check_is_fitted(self)
        bb = self._resolve()
        return save_head(path, self.pipeline_, [str(c) for c in self.classes_], bb, self.report_,
                         getattr(self, "novelty_", None), getattr(self, "conformal_", None))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.string = True  # image paths
        return tags
