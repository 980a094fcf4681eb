"""Classical heads on embeddings: logistic regression, linear SVM, RBF SVM.

Every head is ``Pipeline([("scaler", ...), ("clf", ...)])``: a StandardScaler for the
linear heads, L2 row normalisation for the RBF SVM (see ``make_head``); every head
gives probabilities (SVMs are Platt-calibrated). ``C="auto"`` picks C by
stratified cross-validation over a log grid and reports the score's spread. For the
logistic head the choice is by out-of-fold log-loss (a proper score: accuracy is flat
over C on small sets and picks the smallest C, whose probabilities are far too timid),
and a temperature fitted on the same out-of-fold probabilities is folded into the final
coefficients, so every consumer of the pipeline (predict, evaluate, the estimators, the
ONNX classifier) gets calibrated probabilities. ``choose_C`` returns those out-of-fold
probabilities for other uses (label-issue audits).
Heads are trained on integer class codes 0..K-1; the class names travel in the
head file, so column ``j`` of ``predict_proba`` is class ``classes[j]``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC
from threadpoolctl import threadpool_limits

from featx.errors import FeatXError
from featx.heads.conformal import Conformal, conformal_scores
from featx.heads.kinds import IN_MEMORY_HEADS, check_head_kind
from featx.heads.novelty import Novelty, fit_novelty
from featx.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)

HEADS = IN_MEMORY_HEADS  # the kinds fit here (featx.heads.kinds holds the one list)
# Kornblith et al.'s protocol searches C on a log grid. Each head has its own: on
# standardised embeddings the logistic optimum sits in 1e-4..10; the linear SVM's sits
# lower (1e-4..1e-3 on Fashion-MNIST embeddings at 200, 500 and 2,000 rows, never above
# 1e-2), and each decade of C up multiplies its solver's passes; the RBF SVM on
# unit-length rows wants C of order 1..100 (below 0.1 nearly every row becomes a
# support vector: slower and worse).
C_GRIDS: dict[str, tuple[float, ...]] = {
    "logreg": (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
    "linear-svm": (1e-5, 1e-4, 1e-3, 1e-2),
    "svm-rbf": (0.1, 1.0, 10.0, 100.0),
}
C_GRID = C_GRIDS["logreg"]
# C is chosen on at most this many rows (stratified), then the head is refit on all:
# on 60k x 1280 a full grid x 5 folds would take an hour for a choice that barely moves.
CV_MAX_ROWS = 10_000
# The grid is walked from the smallest C up and stops once PATIENCE values in a row score
# below the best: CV accuracy and log-loss over C have one peak on every probe measured here, and
# the largest C are the slowest fits (each decade multiplies lbfgs's and liblinear's passes).
PATIENCE = 2
# The folds of one C run in parallel, each with one BLAS thread (see fit_head)
FOLD_THREADS = max(1, min(4, os.cpu_count() or 1))
# The final fit on a large table is one L-BFGS run on big matrices: there BLAS threads
# pay (1.2-1.5x on 2 cores at 60,000 x 4,880), unlike on the CV's small folds.
ALL_CORES_FROM = 50_000_000  # rows x features


def default_folds(rows: int) -> int:
    """CV folds when none are asked for: 5, or 3 from 6,000 CV rows on.

    Every CV row is scored once whatever the number of folds; more folds only train
    each fit on a larger share. From 6,000 rows 3 folds cost 40% less (3 fits of 2/3
    of the rows against 5 of 4/5) for a choice of C that barely moves.
    """
    return 3 if rows >= 6000 else 5


def make_head(head: str = "logreg", C: float = 1.0, class_weight: str | dict | None = None,
              seed: int = 0, min_class_count: int | None = None,
              shape: tuple[int, int] | None = None, calibrated: bool = True) -> Pipeline:
    """An unfitted head pipeline: a scaler + the named classifier.

    ``shape`` (rows, features it will be trained on) picks the linear SVM's solver: the
    dual, unless there are over 10x more rows than features (liblinear's advice). sklearn's
    ``dual="auto"`` takes the primal as soon as rows > features, and on 1,600 x 1,280
    standardised embeddings that cost 10 s a fit at C=0.01 and 156 s at C=0.1, against
    3.6 s and 4.7 s for the dual (which converges in under 400 passes up to C=10; the
    primal at C=10 ran 5 minutes without converging). ``calibrated=False``
    leaves the SVMs without their Platt scaling (what cross-validation scores: the
    argmax barely moves and the calibration's inner folds would cost 4x the fits).
    """
    check_head_kind(head, HEADS)
    C = float(C)
    if not C > 0:
        raise FeatXError(f"C must be > 0, got {C}")
    folds = 3 if min_class_count is None else max(2, min(3, min_class_count))
    if head == "logreg":
        # lbfgs on multiple classes is multinomial L2 logistic regression
        clf: BaseEstimator = LogisticRegression(C=C, class_weight=class_weight, max_iter=2000,
                                                random_state=seed)
        return Pipeline([("scaler", StandardScaler()), ("clf", clf)])
    if head == "linear-svm":
        dual = shape is None or shape[0] <= 10 * shape[1]
        # tol 1e-3: a quarter fewer passes than the default 1e-4, same predictions here
        clf = LinearSVC(C=C, class_weight=class_weight, random_state=seed, dual=dual, tol=1e-3,
                        max_iter=1000)
        scaler: BaseEstimator = StandardScaler()
    else:
        # SVC(probability=True) is deprecated (sklearn 1.9); calibrate it the same way as LinearSVC
        clf = SVC(C=C, kernel="rbf", gamma="scale", class_weight=class_weight, random_state=seed)
        # Per-feature standardising blows up the near-dead embedding dimensions (zero on the
        # training set, not quite zero on new images) and the RBF kernel then sees every new
        # image as far from everything: 55% vs 92% on a Fashion-MNIST probe. Unit-length
        # rows keep the kernel's scale meaningful.
        scaler = Normalizer()
    if calibrated:
        clf = CalibratedClassifierCV(clf, method="sigmoid", cv=folds, ensemble=False)
    return Pipeline([("scaler", scaler), ("clf", clf)])


def encode_labels(y: Sequence) -> tuple[np.ndarray, list[str]]:
    """Labels -> (int codes 0..K-1, sorted class names as strings)."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise FeatXError(f"labels must be one-dimensional, got shape {y.shape}")
    if any(v is None for v in y.tolist()):
        raise FeatXError("some images have no label; fit a head on an ImageFolder tree "
                         "(root/<class>/<image>) so every image has a class")
    classes, codes = np.unique(y, return_inverse=True)
    return codes.astype(np.int64), [str(c) for c in classes]


def _check_xy(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or len(X) != len(y):
        raise FeatXError(f"need embeddings (N, dim) and N labels, got {X.shape} and {len(y)} labels")
    if not np.isfinite(X).all():
        raise FeatXError("embeddings contain NaN or inf; re-extract them (the store may be corrupt)")
    return X


def _cv_rows(codes: np.ndarray, seed: int) -> np.ndarray:
    """All rows, or at most about CV_MAX_ROWS keeping each class's share (>= 2 a class)."""
    if len(codes) <= CV_MAX_ROWS:
        return np.arange(len(codes))
    rng = np.random.default_rng(seed)
    frac = CV_MAX_ROWS / len(codes)
    return np.sort(np.concatenate([
        rng.permutation(np.flatnonzero(codes == c))[:max(2, round(float(n) * frac))]
        for c, n in enumerate(np.bincount(codes))]))


# How C="auto" chooses among the grid for the logistic head (see docs/heads.md for the
# measurements): "log_loss" = lowest out-of-fold log-loss; "accuracy" = highest CV accuracy
# (featx before 0.x; ties to the smaller C); "accuracy+log_loss" = highest accuracy, ties
# broken by log-loss; "calibrated_log_loss" = lowest out-of-fold log-loss after each C's own
# temperature (what the head will be once calibrated). The SVMs are scored uncalibrated, so they always use accuracy.
SELECT = ("log_loss", "accuracy", "accuracy+log_loss", "calibrated_log_loss")
DEFAULT_SELECT = "log_loss"
# bounds of the fitted temperature: outside them the out-of-fold probabilities say more
# about a broken search than about calibration
T_BOUNDS = (0.05, 20.0)


@dataclass
class CChoice:
    """What the C search found: the best C, the score of every C tried, and a warm start.

    For the logistic head also the out-of-fold probabilities at the chosen C:
    ``oof_proba[i]`` is the probability row of ``X[oof_rows[i]]`` (class codes 0..K-1 as
    columns) from the fold model that did not see that row, after the ``temperature``
    fitted on them; ``oof_codes`` are those rows' labels. The SVMs' search is scored
    uncalibrated, so they have none (None). ``featx audit`` (label issues) reads these.
    """

    C: float
    grid: list[dict]
    folds: int
    rows: int
    skipped: list[float]
    warm: tuple[np.ndarray, np.ndarray] | None = None  # logreg: fold-mean (coef, intercept) at C
    select: str = "accuracy"
    temperature: float = 1.0
    oof_rows: np.ndarray | None = None
    oof_codes: np.ndarray | None = None
    oof_proba: np.ndarray | None = None
    oof_log_loss_raw: float | None = None  # before the temperature


def choose_C(X: np.ndarray, codes: np.ndarray, head: str, class_weight, cv: int | None, seed: int,
             grid: Sequence[float] | None = None, select: str | None = None,
             progress: ProgressFn = no_progress) -> CChoice:
    """Stratified CV over ``grid`` (default: the head's ``C_GRIDS`` row), smallest C first.

    The folds of one C are fitted in parallel threads (one BLAS thread each); for logreg
    each fold starts from its solution at the previous C. Every C gets its CV accuracy
    (balanced with ``class_weight="balanced"``) and, for logreg, its out-of-fold log-loss;
    ``select`` (default ``DEFAULT_SELECT``, see ``SELECT``) says which picks C. The walk
    stops once ``PATIENCE`` C values in a row score below the best (those left are
    ``skipped``). Reports ``progress("choose C", fits done, grid x folds)`` after every
    fold (the total shrinks to the fits done when the walk stops), so a Ctrl-C lands
    between two fits. The SVMs are scored without their calibration, by accuracy.

    This is also the one place to get out-of-fold probabilities of a head: pass
    ``grid=[C]`` for a fixed C. For logreg the result holds them (``oof_proba``,
    ``oof_rows``, ``oof_codes``) at the chosen C, with the ``temperature`` fitted on them
    applied.
    """
    grid = sorted(C_GRIDS[head] if grid is None else grid)
    select = select or DEFAULT_SELECT
    if select not in SELECT:
        raise FeatXError(f"unknown C selection {select!r}; expected one of {', '.join(SELECT)}")
    if head != "logreg":
        select = "accuracy"  # no probabilities in the SVMs' search
    rows = _cv_rows(codes, seed)
    Xs, ys = X[rows], codes[rows]
    min_count = int(np.bincount(ys).min())
    folds = min(cv or default_folds(len(rows)), min_count)
    if folds < 2:
        raise FeatXError(
            f"C auto needs at least 2 images of every class for cross-validation; the smallest "
            f"class has {min_count}. Add images or pass a fixed C (e.g. --C 1.0)")
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(Xs, ys))
    metric = balanced_accuracy_score if class_weight == "balanced" else accuracy_score
    models = [make_head(head, grid[0], class_weight, seed, shape=(len(tr), X.shape[1]),
                        calibrated=False) for tr, _ in splits]
    if head == "logreg":
        for m in models:
            m.set_params(clf__warm_start=True)
    scores: list[dict] = []
    warm = best_logits = None
    total, done = len(grid) * folds, [0]

    def tick() -> None:
        done[0] += 1
        progress("choose C", done[0], total)

    progress("choose C", 0, total)
    with warnings.catch_warnings():  # convergence is read from n_iter_ (warnings are process-wide)
        warnings.simplefilter("ignore", ConvergenceWarning)
        for C in grid:
            row, logits = _score_C(C, models, splits, Xs, ys, metric, head == "logreg", tick)
            scores.append(row)
            if head == "logreg" and scores[-1] is _best(scores, select):
                warm = (np.mean([m[-1].coef_ for m in models], axis=0),
                        np.mean([m[-1].intercept_ for m in models], axis=0))
                best_logits = logits
            if _fell(scores, select):
                break
    done = done[0]
    if done < total:
        progress("choose C", done, done)
    best = _best(scores, select)
    skipped = [float(C) for C in grid[len(scores):]]
    if skipped:
        log.info("C search stopped after %d values fell below the best; skipped %s", PATIENCE, skipped)
    choice = CChoice(best["C"], scores, folds, len(rows), skipped, warm, select)
    if best_logits is not None:
        T = fit_temperature(best_logits, ys)
        choice.temperature = T
        choice.oof_rows, choice.oof_codes = rows, ys
        choice.oof_proba = softmax(best_logits / T)
        choice.oof_log_loss_raw = _nll(best_logits, ys)
    return choice


def _score_C(C: float, models: list[Pipeline], splits: list, Xs: np.ndarray, ys: np.ndarray,
             metric, with_logits: bool, tick: Callable[[], None]) -> tuple[dict, np.ndarray | None]:
    """Fit every fold's model at ``C`` (in parallel) and score it on its held-out rows.

    With ``with_logits`` (logreg) also the out-of-fold logits of every row, their log-loss,
    and the temperature and log-loss after it (for the record and ``calibrated_log_loss``).
    """
    for m in models:
        m.set_params(clf__C=C)
    s, losses = [], []
    logits = np.zeros((len(ys), int(ys.max()) + 1)) if with_logits else None
    fits = [lambda m=m, tr=tr: m.fit(Xs[tr], ys[tr]) for m, (tr, _) in zip(models, splits, strict=True)]
    for j, _ in enumerate(in_threads(fits, FOLD_THREADS)):
        te = splits[j][1]
        if logits is not None:
            logits[te] = _logits(models[j], Xs[te])
            losses.append(_nll(logits[te], ys[te]))
            s.append(metric(ys[te], logits[te].argmax(1)))
        else:
            s.append(metric(ys[te], models[j].predict(Xs[te])))
        tick()
    row = {"C": float(C), "mean": float(np.mean(s)), "std": float(np.std(s)),
           "converged": all(_converged(m) for m in models)}
    if losses:
        t = fit_temperature(logits, ys)
        row.update({"log_loss": float(np.mean(losses)), "log_loss_std": float(np.std(losses)),
                    "temperature": t, "calibrated_log_loss": _nll(logits / t, ys)})
    log.info("C=%g: CV score %.4f +- %.4f%s", C, np.mean(s), np.std(s),
             f", log-loss {row['log_loss']:.4f}" if losses else "")
    return row, logits


def _logits(model: Pipeline, X: np.ndarray) -> np.ndarray:
    """The logistic head's logits (N, K): softmax of them is its predict_proba.

    Two classes: sklearn's one decision value z is the logit pair (-z/2, z/2), whose
    softmax is (1 - sigmoid(z), sigmoid(z)).
    """
    z = np.asarray(model.decision_function(X), np.float64)
    return np.stack([-z / 2, z / 2], axis=1) if z.ndim == 1 else z


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of softmax(logits) at labels ``y``."""
    z = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimising the log-loss of softmax(logits / T) (Guo et al. 2017).

    One parameter, fitted on out-of-fold logits: it rescales confidence without moving
    any argmax. Searched on log T within ``T_BOUNDS``. The targets are smoothed by
    Laplace's rule of succession (1 / (n + K) of each row's weight spread over the K
    classes): with no out-of-fold mistake the plain log-loss falls without end as T
    shrinks, and 100 right answers do not make a head 99.99999% sure; on thousands of
    rows the smoothing changes nothing measurable.
    """
    from scipy.optimize import minimize_scalar

    n, k = logits.shape
    eps = 1.0 / (n + k)
    target = np.full((n, k), eps / k)
    target[np.arange(n), y] += 1.0 - eps

    def loss(t: float) -> float:
        z = logits / np.exp(t)
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-(target * logp).sum(axis=1).mean())

    lo, hi = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    r = minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(r.x))


def _key(r: dict, select: str) -> tuple:
    # higher is better; ties go to the smaller C: stronger regularisation generalises at least as well
    if select in ("log_loss", "calibrated_log_loss"):
        return (-round(r[select], 6), -r["C"])
    if select == "accuracy+log_loss":
        return (round(r["mean"], 6), -round(r["log_loss"], 6), -r["C"])
    return (round(r["mean"], 6), -r["C"])


def _best(scores: list[dict], select: str = "accuracy") -> dict:
    return max(scores, key=lambda r: _key(r, select))


def _fell(scores: list[dict], select: str = "accuracy") -> bool:
    """The last PATIENCE scores are all below the best one before them."""
    if len(scores) <= PATIENCE:
        return False
    top = _key(_best(scores[:-PATIENCE], select), select)[:-1]
    return all(_key(r, select)[:-1] < top for r in scores[-PATIENCE:])


def _converged(model: Pipeline) -> bool:
    clf = model[-1]
    n_iter = np.max(getattr(clf, "n_iter_", 0))
    max_iter = getattr(clf, "max_iter", -1)
    return max_iter is None or max_iter < 0 or int(n_iter) < max_iter


def fit_head(X: np.ndarray, y: Sequence, head: str = "logreg", C: float | str = "auto",
             class_weight: str | dict | None = None, cv: int | None = None,
             seed: int = 0, progress: ProgressFn = no_progress, *,
             select: str | None = None) -> tuple[Pipeline, dict]:
    """Fit a head on embeddings ``X`` with labels ``y``; returns (pipeline, report).

    The pipeline is trained on int codes: ``report["classes"][j]`` names code ``j``.
    The report holds the chosen C, the CV score's mean and spread (when C is auto),
    the class counts, the training accuracy and the time taken. ``progress`` hears
    ``("choose C", fits done, fits)`` during the search and ``("fit", 0|1, 1)``
    around the final fit.

    With ``C="auto"`` the logistic head is calibrated: the temperature fitted on the
    search's out-of-fold probabilities (``choose_C``) divides its coefficients and
    intercept, so ``predict_proba`` is softmax(logits / T); ``report["calibration"]``
    records T and the out-of-fold log-loss before and after. A fixed C runs no CV and
    is left uncalibrated (recorded as method "none"). ``select`` overrides how C is
    chosen (``SELECT``; default ``DEFAULT_SELECT``).
    """
    # Multi-threaded BLAS on these small matrices busy-waits against the other
    # threads on the machine: 100x slower on a shared 2-core box, never faster here.
    with one_blas_thread():
        return _fit_head(X, y, head, C, class_weight, cv, seed, progress, select)


@dataclass
class HeadFit:
    """A fitted head with what the head file keeps beside it (``fit_head_full``).

    ``choice`` is the C search (None for a fixed C): its out-of-fold probabilities
    (``choice.oof_proba``) are the ones the temperature and the conformal scores were
    fitted on. ``novelty`` flags embeddings unlike the training rows; ``conformal`` gives
    prediction sets (None without out-of-fold probabilities).
    """

    pipeline: Pipeline
    report: dict
    choice: CChoice | None
    novelty: Novelty | None
    conformal: Conformal | None


def fit_head_full(X: np.ndarray, y: Sequence, head: str = "logreg", C: float | str = "auto",
                  class_weight: str | dict | None = None, cv: int | None = None,
                  seed: int = 0, progress: ProgressFn = no_progress, *,
                  select: str | None = None, novelty: bool = True) -> HeadFit:
    """``fit_head``, plus the search itself, the novelty sample and the conformal scores.

    What ``featx fit-head`` and ``FeatXClassifier`` save; ``novelty=False`` skips the
    out-of-distribution sample (``featx.heads.novelty``).
    """
    with one_blas_thread():
        pipe, report, choice = _fit_head(X, y, head, C, class_weight, cv, seed, progress, select,
                                         with_choice=True)
        nov = fit_novelty(np.asarray(X), seed=seed) if novelty else None
    conf = None
    if choice is not None and choice.oof_proba is not None:
        conf = Conformal(conformal_scores(choice.oof_proba, choice.oof_codes))
    if nov is not None:
        report["novelty"] = {"method": "knn-cosine", "sample_rows": len(nov.sample),
                             "quantile": nov.quantile, "threshold": nov.threshold()}
    return HeadFit(pipe, report, choice, nov, conf)


def interruptible(fn, *args):
    """``fn(*args)`` in a worker thread, so that Ctrl-C is heard within a fraction of a second."""
    return next(in_threads([lambda: fn(*args)], 1))


def in_threads(tasks: Sequence[Callable[[], object]], workers: int) -> Iterator[object]:
    """Run ``tasks`` in daemon threads, at most ``workers`` at a time; yield results in order.

    liblinear and libsvm release the GIL but never return to Python during a fit, so a
    signal would wait for the whole fit (minutes on a large table). Here the calling
    thread waits in short slices and raises KeyboardInterrupt at once; abandoned fits
    finish in the background (daemon threads: a CLI process just exits).
    """
    for first in range(0, len(tasks), workers):
        batch = tasks[first:first + workers]
        out: list[dict] = [{} for _ in batch]

        def work(task, box) -> None:
            try:
                box["value"] = task()
            except BaseException as e:  # handed to the caller's thread below
                box["error"] = e

        threads = [threading.Thread(target=work, args=(t, box), name="featx-fit", daemon=True)
                   for t, box in zip(batch, out, strict=True)]
        for t in threads:
            t.start()
        for t, box in zip(threads, out, strict=True):
            while t.is_alive():
                t.join(0.1)
            if "error" in box:
                raise box["error"]
            yield box["value"]


def one_blas_thread():
    """Context manager: BLAS/OpenMP pools limited to one thread."""
    return threadpool_limits(limits=1)


def _check_calibration_counts(head: str, codes: np.ndarray, classes: list[str]) -> None:
    """The SVM heads calibrate their scores on held-out folds (2 at least): every class needs
    2 images, else scikit-learn's ValueError would come from deep inside the fit."""
    if head not in ("linear-svm", "svm-rbf"):
        return
    counts = np.bincount(codes, minlength=len(classes))
    few = [classes[c] for c in np.flatnonzero(counts < 2)]
    if few:
        raise FeatXError(f"the {head} head needs at least 2 images in every class (its probabilities are "
                         f"calibrated on held-out folds); {len(few)} class(es) have 1: "
                         f"{', '.join(few[:5])}{' ...' if len(few) > 5 else ''}. Add images, or use "
                         "--head logreg")


def _fit_head(X, y, head, C, class_weight, cv, seed, progress, select=None, with_choice=False):
    t0 = time.perf_counter()
    check_head_kind(head, HEADS)
    if class_weight not in (None, "balanced") and not isinstance(class_weight, dict):
        raise FeatXError(f"class_weight must be None, 'balanced' or a dict, got {class_weight!r}")
    codes, classes = encode_labels(y)
    X = _check_xy(X, codes)
    if len(classes) < 2:
        raise FeatXError(f"a head needs at least 2 classes, found {len(classes)} ({classes}); "
                         "check the folder layout root/<class>/<image>")
    _check_calibration_counts(head, codes, classes)
    report: dict = {"head": head, "class_weight": class_weight, "n_train": len(codes),
                    "dim": int(X.shape[1]), "classes": classes,
                    "class_counts": {classes[c]: n for c, n in sorted(Counter(codes.tolist()).items())}}
    if isinstance(C, str):
        if C != "auto":
            raise FeatXError(f"C must be a positive number or 'auto', got {C!r}")
        choice = choose_C(X, codes, head, class_weight, cv, seed, select=select, progress=progress)
        mean = next(g for g in choice.grid if g["C"] == choice.C)
        report.update({"C": choice.C, "C_auto": True, "cv_folds": choice.folds, "cv_rows": choice.rows,
                       "cv_metric": "balanced_accuracy" if class_weight == "balanced" else "accuracy",
                       "cv_select": choice.select,
                       "cv_score_mean": mean["mean"], "cv_score_std": mean["std"], "cv_grid": choice.grid,
                       "cv_skipped": choice.skipped})
        if "log_loss" in mean:
            report.update({"cv_log_loss": mean["log_loss"], "cv_log_loss_std": mean["log_loss_std"]})
    else:
        choice = None
        report.update({"C": float(C), "C_auto": False})
    pipe = make_head(head, report["C"], class_weight, seed, min_class_count=int(np.bincount(codes).min()),
                     shape=X.shape)
    warm = choice.warm if choice is not None else None
    if warm is not None:
        _warm_start(pipe[-1], *warm)
    progress("fit", 0, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        with threadpool_limits(limits=os.cpu_count() if X.size >= ALL_CORES_FROM else 1):
            interruptible(pipe.fit, X, codes)
    if warm is not None:
        pipe[-1].set_params(warm_start=False)  # the saved head is a plain estimator
    progress("fit", 1, 1)
    report["calibration"] = _calibrate(pipe, choice)
    report["converged"] = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    report["train_accuracy"] = float((pipe.predict(X) == codes).mean())
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return (pipe, report, choice) if with_choice else (pipe, report)


def _calibrate(pipe: Pipeline, choice: CChoice | None) -> dict:
    """Fold the search's temperature into the logistic head; what was done, for the record."""
    clf = pipe[-1]
    if isinstance(clf, CalibratedClassifierCV):
        return {"method": "sigmoid", "fitted_on": "cross-validated decision values of the "
                "training rows (Platt scaling, per class)"}
    if choice is None or choice.oof_proba is None:
        return {"method": "none", "reason": "C was given, so no cross-validation ran; pass "
                "C='auto' for probabilities calibrated on out-of-fold predictions"}
    T = choice.temperature
    # softmax(z / T) with z = x W^T + b is the same model with W / T and b / T: one
    # definition of the calibrated probabilities, which every consumer of the pipeline
    # (predict, evaluate, estimators, skl2onnx) then computes without knowing about it
    clf.coef_ = clf.coef_ / T
    clf.intercept_ = clf.intercept_ / T
    return {"method": "temperature", "temperature": T, "applied": "coefficients and intercept "
            "divided by T (probabilities = softmax(logits / T))",
            "fitted_on": f"out-of-fold probabilities of the C search at C={choice.C:g} "
                         f"({choice.rows} rows, {choice.folds} folds)",
            "oof_log_loss_before": choice.oof_log_loss_raw,
            "oof_log_loss_after": _nll(np.log(np.clip(choice.oof_proba, 1e-300, None)),
                                       choice.oof_codes)}


def _warm_start(clf: LogisticRegression, coef: np.ndarray, intercept: np.ndarray) -> None:
    """Start lbfgs from the folds' solution at the chosen C: on all rows it is nearly the
    optimum already (same C, nearly the same scaler), so the final fit needs a few passes."""
    clf.set_params(warm_start=True)
    clf.coef_, clf.intercept_ = coef.copy(), intercept.copy()
