"""Out-of-fold class probabilities of the logistic head, for label auditing (``featx audit``).

Every row's probabilities come from a fold model that never saw that row: what
cleanlab's confident learning needs. The C search is ``heads.fit``'s (its grid,
its folds, its smallest-C-first walk with warm starts and early stop); the fold
models' predictions at each C are kept, so the out-of-fold probabilities at the
chosen C cost no extra fit. C is chosen by out-of-fold log loss here (these
probabilities are what the audit reads), not by accuracy.

Speed: the rows are standardised once on the whole table (no labels are used) and,
when there are more features than rows, rotated onto the table's own row space (the
eigenvectors of the rows' Gram matrix). L2-penalised logistic regression is invariant to
that rotation, so the fit is the same on ``min(n, d)`` columns: 4,880 -> 2,000 on a
2,000-image ``multi`` table.
Above ``heads.fit.CV_MAX_ROWS`` rows C is searched on a stratified sample and the
folds are fitted once on every row at that C, each warm-started from the sample's
solution.

``oof_proba`` is the one entry point: swap its body for the head's own out-of-fold
probabilities when ``heads.fit`` exposes them.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from featx.errors import FeatXError
from featx.heads.fit import (
    C_GRIDS,
    FOLD_THREADS,
    PATIENCE,
    _cv_rows,
    default_folds,
    encode_labels,
    in_threads,
    one_blas_thread,
)
from featx.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)

__all__ = ["OOFResult", "oof_proba"]


@dataclass
class OOFResult:
    """Out-of-fold probabilities: ``proba[i, j]`` is P(class ``classes[j]``) for row ``i``."""

    proba: np.ndarray
    codes: np.ndarray
    classes: list[str]
    C: float
    folds: int
    grid: list[dict]
    seconds: float

    def summary(self) -> dict:
        return {"C": self.C, "folds": self.folds, "grid": self.grid, "seconds": round(self.seconds, 3),
                "oof_accuracy": float((self.proba.argmax(1) == self.codes).mean())}


def _features(X: np.ndarray) -> np.ndarray:
    """Standardised rows, rotated onto their row space when there are more columns than rows."""
    X = np.asarray(X, dtype=np.float64)
    mu, sd = X.mean(0), X.std(0)
    Z = (X - mu) / np.where(sd > 0, sd, 1.0)
    if Z.shape[1] <= Z.shape[0]:
        return Z
    # Z Z^T = V w V^T, so V sqrt(w) has every inner product of Z's rows: the L2 problem is
    # unchanged. The Gram matrix and its eigh cost 3 s on 2,000 x 4,880 (an SVD of Z: 12 s)
    w, V = np.linalg.eigh(Z @ Z.T)
    keep = w > w[-1] * 1e-10
    return V[:, keep] * np.sqrt(w[keep])


def _log_loss(codes: np.ndarray, P: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(P[np.arange(len(codes)), codes], 1e-15, 1.0))))


def _model(C: float, seed: int) -> LogisticRegression:
    return LogisticRegression(C=C, max_iter=2000, random_state=seed, warm_start=True)


def _search(Z: np.ndarray, codes: np.ndarray, k: int, folds: int, seed: int, grid, progress: ProgressFn,
            done0: int, total: int) -> tuple[float, list[dict], np.ndarray | None, tuple | None]:
    """Walk ``grid`` up, smallest C first; returns (best C, scores, its OOF proba, its mean coef)."""
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(Z, codes))
    models = [_model(grid[0], seed) for _ in splits]
    scores: list[dict] = []
    best_P, best_warm = None, None
    done = done0
    for C in grid:
        P = np.zeros((len(codes), k))
        for m in models:
            m.set_params(C=C)
        fits = [lambda m=m, tr=tr: m.fit(Z[tr], codes[tr]) for m, (tr, _) in zip(models, splits, strict=True)]
        for j, _ in enumerate(in_threads(fits, FOLD_THREADS)):
            te = splits[j][1]
            P[np.ix_(te, models[j].classes_)] = models[j].predict_proba(Z[te])
            done += 1
            progress("out-of-fold probabilities", done, total)
        loss = _log_loss(codes, P)
        scores.append({"C": float(C), "log_loss": loss, "accuracy": float((P.argmax(1) == codes).mean())})
        log.info("C=%g: out-of-fold log loss %.4f", C, loss)
        if min(scores, key=lambda r: r["log_loss"]) is scores[-1]:
            best_P = P
            best_warm = (np.mean([m.coef_ for m in models], axis=0),
                         np.mean([m.intercept_ for m in models], axis=0))
        best_i = min(range(len(scores)), key=lambda i: scores[i]["log_loss"])
        if len(scores) - 1 - best_i >= PATIENCE:  # PATIENCE values in a row worse than the best
            break
    best = min(scores, key=lambda r: r["log_loss"])
    return best["C"], scores, best_P, best_warm


def oof_proba(X: np.ndarray, y, *, cv: int | None = None, seed: int = 0,
              progress: ProgressFn = no_progress) -> OOFResult:
    """Out-of-fold probabilities of a logistic head on ``X`` with labels ``y`` (see the module doc).

    Every class needs at least 2 rows (one per side of a fold); a class with one image is
    a ``FeatXError`` that names it.
    """
    t0 = time.perf_counter()
    codes, classes = encode_labels(y)
    if len(classes) < 2:
        raise FeatXError(f"auditing labels needs at least 2 classes, found {len(classes)}")
    counts = np.bincount(codes, minlength=len(classes))
    if counts.min() < 2:
        lonely = [classes[c] for c in np.flatnonzero(counts < 2)]
        raise FeatXError(f"class{'es' if len(lonely) > 1 else ''} {', '.join(map(repr, lonely))} "
                         f"{'have' if len(lonely) > 1 else 'has'} a single image: out-of-fold "
                         "probabilities need at least 2 images a class; add images or leave the "
                         "class out")
    grid = sorted(C_GRIDS["logreg"])
    with one_blas_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        Z = _features(X)
        rows = _cv_rows(codes, seed)
        sub = len(rows) < len(codes)
        folds = min(cv or default_folds(len(rows)), int(counts.min()))
        total = len(grid) * folds + (folds if sub else 0)
        progress("out-of-fold probabilities", 0, total)
        if not sub:
            C, scores, P, _ = _search(Z, codes, len(classes), folds, seed, grid, progress, 0, total)
        else:
            # C on a sample, then every row's folds once at that C, warm-started
            C, scores, _, warm = _search(Z[rows], codes[rows], len(classes), folds, seed, grid,
                                         progress, 0, total)
            done = len(scores) * folds
            total = done + folds
            splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(Z, codes))
            models = [_model(C, seed) for _ in splits]
            for m in models:
                m.coef_, m.intercept_ = warm[0].copy(), warm[1].copy()
            P = np.zeros((len(codes), len(classes)))
            fits = [lambda m=m, tr=tr: m.fit(Z[tr], codes[tr]) for m, (tr, _) in zip(models, splits, strict=True)]
            for j, _ in enumerate(in_threads(fits, FOLD_THREADS)):
                te = splits[j][1]
                P[np.ix_(te, models[j].classes_)] = models[j].predict_proba(Z[te])
                progress("out-of-fold probabilities", done + j + 1, total)
        progress("out-of-fold probabilities", total, total)
    return OOFResult(P, codes, classes, float(C), folds, scores, time.perf_counter() - t0)
