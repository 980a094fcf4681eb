"""Conformal prediction sets: the classes an image may be, with a stated coverage.

A head fitted with ``C="auto"`` already has, from its C search, a calibrated out-of-fold
probability row for every cross-validated training row. Their LAC conformity scores
(1 - the probability of the true class; Sadinle et al. 2019, MAPIE's
``LACConformityScore``) are stored in the head file. At predict time MAPIE turns them
into the score quantile for the asked coverage (its finite-sample ``ceil((n + 1)(1 -
alpha))``-th score) and a prediction set per image: every class whose probability is at
least 1 - that quantile. On images exchangeable with the training rows the set holds the
true class with probability >= the coverage. The fold models saw a share (1 - 1/folds) of
the rows, the final head all of them, so on new images the sets are slightly conservative.

MAPIE is an optional dependency (``pip install featx[conformal]``); nothing here needs it
until a set is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featx.errors import FeatXError

__all__ = ["Conformal", "conformal_scores"]

METHOD = "lac"


def _mapie_lac():
    try:
        from mapie.conformity_scores import LACConformityScore
    except ImportError:
        raise FeatXError("conformal prediction sets (--coverage) need MAPIE: "
                         "pip install 'featx[conformal]'") from None
    return LACConformityScore()


def conformal_scores(oof_proba: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """LAC conformity scores (1 - probability of the true class) of out-of-fold rows, sorted."""
    p = np.asarray(oof_proba, np.float64)
    codes = np.asarray(codes, np.int64)
    return np.sort(1.0 - p[np.arange(len(codes)), codes])


@dataclass
class Conformal:
    """The conformity scores a head keeps for prediction sets (see the module docstring)."""

    scores: np.ndarray

    def quantile(self, coverage: float) -> float:
        """The conformity-score quantile for ``coverage`` (MAPIE's split-conformal rule)."""
        if not 0.0 < coverage < 1.0:
            raise FeatXError(f"coverage must be between 0 and 1 (exclusive), got {coverage}")
        n = len(self.scores)
        if np.ceil((n + 1) * coverage) > n:
            raise FeatXError(f"coverage {coverage:g} needs more than the {n} out-of-fold rows this "
                             f"head kept (at most {n / (n + 1):.3f}); ask for less, or fit on more images")
        lac = _mapie_lac()
        alpha = np.array([1.0 - coverage])
        q = lac.get_conformity_score_quantiles(self.scores.reshape(-1, 1), alpha, cv="prefit")
        return float(np.ravel(q)[0])

    def sets(self, proba: np.ndarray, coverage: float) -> np.ndarray:
        """Boolean (N, K): class j is in image i's set at ``coverage``."""
        proba = np.asarray(proba, np.float64)
        if len(proba) == 0:
            return np.zeros(proba.shape, bool)
        lac = _mapie_lac()
        alpha = np.array([1.0 - coverage])
        lac.quantiles_ = np.array([self.quantile(coverage)])
        out = lac.get_prediction_sets(proba[:, :, None], self.scores.reshape(-1, 1), alpha, cv="prefit")
        sets = np.asarray(out)[:, :, 0].astype(bool)
        sets[np.arange(len(proba)), proba.argmax(1)] = True  # never empty
        return sets

    def to_record(self) -> tuple[dict, dict[str, np.ndarray]]:
        return ({"method": METHOD, "rows": len(self.scores), "scores": "conformal.scores",
                 "fitted_on": "out-of-fold probabilities of the C search (after the temperature)"},
                {"conformal.scores": self.scores.astype(np.float64)})

    @classmethod
    def from_record(cls, spec: dict, arrays: dict[str, np.ndarray]) -> Conformal:
        """Rebuild from the head file; ValueError on anything that does not add up."""
        if not isinstance(spec, dict) or spec.get("method") != METHOD:
            raise ValueError("unknown conformal method")
        a = arrays.get(spec.get("scores")) if isinstance(spec.get("scores"), str) else None
        if a is None or a.dtype.kind != "f" or a.ndim != 1 or len(a) < 1 or not np.isfinite(a).all() \
                or (a < -1e-9).any() or (a > 1 + 1e-9).any():
            raise ValueError("conformal scores missing or malformed")
        return cls(np.sort(a.astype(np.float64)))
