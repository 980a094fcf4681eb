"""The part of a ``multi`` embedding a head uses: the whole vector, or its last segment.

A ``multi`` embedding (featx.backbones.features) ends with the backbone's own pooled
output, the ``last`` embedding. On some data the intermediate stages help a linear
probe (digits: 98.0% against 93.1%), on others they add only width; fit-head scores
both by the same cross-validation and keeps the better one. A head fitted on the last
segment is then *widened* to the whole vector (``widen``): zero weights and identity
scaling for the other columns, so its probabilities are exactly those of the narrow
head, and the head file, predict, evaluate and the ONNX classifier see one kind of head.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from featx.errors import FeatXError

log = logging.getLogger(__name__)

__all__ = ["SEGMENTS", "SEGMENT_TIE", "check_segment", "choose_segment", "last_segment", "widen"]

SEGMENTS = ("auto", "all", "last")
# the last segment must beat the whole multi vector by more than this CV accuracy to be kept
SEGMENT_TIE = 0.001


def check_segment(segment: str) -> str:
    """``segment`` if it is one of ``SEGMENTS``, else a FeatXError naming the choices."""
    if segment not in SEGMENTS:
        raise FeatXError(f"unknown segment {segment!r}; expected one of {', '.join(SEGMENTS)}")
    return segment


def last_segment(features: Mapping[str, Any] | None) -> slice | None:
    """Columns of the ``last`` embedding inside a ``multi`` one, from an export's
    ``features`` record (its sidecar's ``extra["features"]``); None for other exports."""
    if not isinstance(features, Mapping) or features.get("name") != "multi":
        return None
    segs = features.get("segments")
    if not isinstance(segs, list) or not segs or not isinstance(segs[-1], Mapping):
        return None
    start, stop = segs[-1].get("start"), segs[-1].get("stop")
    if not isinstance(start, int) or not isinstance(stop, int) or not 0 <= start < stop:
        return None
    return slice(start, stop)


def widen(pipeline, cols: slice, dim: int):
    """A scaler + logistic-regression pipeline fitted on ``X[:, cols]``, as one on all ``dim``
    columns that gives the same probabilities (the other columns weigh nothing)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    steps = dict(pipeline.steps) if isinstance(pipeline, Pipeline) else {}
    scaler, clf = steps.get("scaler"), steps.get("clf")
    if (len(steps) != 2 or type(scaler) is not StandardScaler or type(clf) is not LogisticRegression):
        raise FeatXError("only a scaler + logistic regression head can use the last segment alone")
    s = copy.deepcopy(scaler)
    for name, fill in (("mean_", 0.0), ("scale_", 1.0), ("var_", 1.0)):
        old = getattr(scaler, name, None)
        if old is not None:
            new = np.full(dim, fill, dtype=np.asarray(old).dtype)
            new[cols] = old
            setattr(s, name, new)
    s.n_features_in_ = dim
    c = copy.deepcopy(clf)
    coef = np.zeros((clf.coef_.shape[0], dim), dtype=clf.coef_.dtype)
    coef[:, cols] = clf.coef_
    c.coef_ = coef
    c.n_features_in_ = dim
    return Pipeline([("scaler", s), ("clf", c)])


def choose_segment(X: np.ndarray, features: Mapping[str, Any] | None, head: str, C, segment: str,
                   fit: Callable[[np.ndarray], tuple[object, dict]], name: str = "this backbone"
                   ) -> tuple[object, dict]:
    """The head on all columns of ``X`` or on the last segment of a multi embedding.

    ``features`` is the export's features record (``Backbone.meta["features"]``);
    ``fit(X)`` fits one head and returns (pipeline, report). ``segment="auto"`` with
    ``C="auto"`` and a logreg head on a multi embedding fits both and keeps the last
    segment only when its CV accuracy beats the whole vector's by more than
    ``SEGMENT_TIE``; the kept last-segment head is widened to all columns. What
    ``featx fit-head --segment`` and ``FeatXClassifier(segment=)`` both do.
    """
    check_segment(segment)
    cols = last_segment(features)
    if segment == "last" and (cols is None or head != "logreg"):
        raise FeatXError("--segment last needs a logreg head on a multi table (`featx extract "
                         f"--features multi`); this is a {head} head on {name} "
                         f"({'multi' if cols is not None else 'last'} features)")
    if cols is None or head != "logreg" or segment == "all" or (segment == "auto" and C != "auto"):
        pipe, rep = fit(X)
        if cols is not None:
            rep["segment"] = "all"
        return pipe, rep
    narrow = np.ascontiguousarray(X[:, cols])
    if segment == "last":
        pipe, rep = fit(narrow)
        scores = None
    else:
        pipe_all, rep_all = fit(X)
        pipe, rep = fit(narrow)
        scores = {"all": rep_all["cv_score_mean"], "last": rep["cv_score_mean"]}
        if scores["last"] <= scores["all"] + SEGMENT_TIE:
            rep_all.update(segment="all", segment_cv=scores)
            return pipe_all, rep_all
    try:
        wide = widen(pipe, cols, int(X.shape[1]))
    except FeatXError:
        if scores is None:
            raise
        # a head kind widen cannot rewrite: keep the whole vector rather than fail the fit
        log.warning("the last segment scored better, but this head cannot be widened; using all columns")
        rep_all.update(segment="all", segment_cv=scores)
        return pipe_all, rep_all
    rep.update(segment="last", segment_columns=[cols.start, cols.stop], dim=int(X.shape[1]),
               segment_dim=cols.stop - cols.start)
    if scores:
        rep["segment_cv"] = scores
    return wide, rep
