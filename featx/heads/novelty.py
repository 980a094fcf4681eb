"""Out-of-distribution signal: how far an embedding is from everything the head was trained on.

A head's probabilities say which of its classes an image resembles most, never whether it
resembles any of them: an astronaut photo given to a Fashion-MNIST head comes out "shirt"
with probability 1.000. ``Novelty`` keeps a sample of the training embeddings (at most
``MAX_SAMPLE`` rows, float16, unit length after centring on the training mean) and scores
a new embedding by its cosine distance to the ``k``-th nearest of them (deep k-nearest-
neighbour OOD detection, Sun et al. 2022). The threshold is a quantile of the same
distance for the training rows themselves, measured out of sample: a sampled row against
the other sampled rows (itself left out), a row outside the sample against the sample. So
``quantile=0.99`` flags about 1% of images like the training ones as "unknown", and any
image farther from the training set than 99% of its own rows.

The sorted out-of-sample distances are stored, so the quantile can be changed at predict
time without refitting. Below ``SMALL`` training rows the empirical tail is mostly noise
(the 0.99 quantile of 30 distances is their maximum, which flagged 9% of new garments on
one draw of 10 Fashion-MNIST images a class), so the threshold is then the larger of the
empirical quantile and the same quantile of a normal fitted to the distances. Everything is numeric arrays + JSON in the head file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featx.errors import FeatXError

__all__ = ["DEFAULT_QUANTILE", "MAX_SAMPLE", "Novelty", "fit_novelty"]

# Training rows kept for the distance: 2,000 x 1,280 float16 is 5 MB in the head file; wider
# embeddings keep fewer rows (MAX_SAMPLE_VALUES numbers, at least MIN_SAMPLE rows). A head
# on 10,000 Fashion-MNIST images with 500, 1,000, 2,000 or 5,000 sampled rows flagged all
# 20 photos of bench/calibration.py and 0.90-1.02% of the 10,000 test images.
MAX_SAMPLE = 2000
MAX_SAMPLE_VALUES = 2_600_000
MIN_SAMPLE = 500
# Rows whose out-of-sample distance sets the threshold (beyond this, the quantile barely moves)
MAX_THRESHOLD_ROWS = 10_000
K = 1
DEFAULT_QUANTILE = 0.99
SMALL = 200
METHOD = "knn-cosine"


def _unit(X: np.ndarray, center: np.ndarray) -> np.ndarray:
    Z = np.asarray(X, np.float32) - center
    n = np.linalg.norm(Z, axis=1, keepdims=True)
    return Z / np.maximum(n, 1e-12)


def _kth_distance(Q: np.ndarray, S: np.ndarray, k: int, exclude: np.ndarray | None = None,
                  block: int = 2048) -> np.ndarray:
    """Cosine distance of each unit row of Q to its k-th nearest unit row of S.

    ``exclude[i]`` is the row of S that Q[i] itself is (left out), or -1.
    """
    out = np.empty(len(Q), np.float32)
    for a in range(0, len(Q), block):
        sim = Q[a:a + block] @ S.T
        if exclude is not None:
            ex = exclude[a:a + block]
            rows = np.flatnonzero(ex >= 0)
            sim[rows, ex[rows]] = -np.inf
        kk = min(k, sim.shape[1]) - 1
        top = -np.partition(-sim, kk, axis=1)[:, kk]
        out[a:a + block] = 1.0 - top
    return out


@dataclass
class Novelty:
    """What a head keeps to flag embeddings unlike its training rows (see the module docstring).

    ``sample``: unit-length centred training rows (float16); ``center``: the training mean;
    ``distances``: the training rows' own out-of-sample distances, sorted; ``quantile``: the
    default share of them a flagged image must exceed.
    """

    sample: np.ndarray
    center: np.ndarray
    distances: np.ndarray
    k: int = K
    quantile: float = DEFAULT_QUANTILE

    def threshold(self, quantile: float | None = None) -> float:
        """The distance above which an embedding is "unknown" at ``quantile`` (default: the head's)."""
        q = self.quantile if quantile is None else quantile
        if not 0.0 < q <= 1.0:
            raise FeatXError(f"the unknown quantile must be in (0, 1], got {q}")
        emp = float(np.quantile(self.distances, q, method="higher"))
        if len(self.distances) >= SMALL or q >= 1.0:
            return emp
        from scipy.stats import norm

        d = self.distances.astype(np.float64)
        return max(emp, float(d.mean() + norm.ppf(q) * d.std(ddof=1))) if len(d) > 2 else emp

    def score(self, X: np.ndarray) -> np.ndarray:
        """Cosine distance of each embedding to its k-th nearest stored training row."""
        if len(X) == 0:
            return np.zeros(0, np.float32)
        return _kth_distance(_unit(X, self.center), self.sample.astype(np.float32), self.k)

    def is_unknown(self, X: np.ndarray, quantile: float | None = None) -> np.ndarray:
        """True where an embedding is farther from the training rows than ``quantile`` of them."""
        return self.score(X) > self.threshold(quantile)

    # ---- head file -------------------------------------------------------------------------
    def to_record(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON spec, arrays) for the head file."""
        spec = {"method": METHOD, "k": self.k, "quantile": self.quantile,
                "threshold": self.threshold(), "sample_rows": len(self.sample),
                "threshold_rows": len(self.distances),
                "sample": "novelty.sample", "center": "novelty.center",
                "distances": "novelty.distances"}
        return spec, {"novelty.sample": self.sample, "novelty.center": self.center,
                      "novelty.distances": self.distances}

    @classmethod
    def from_record(cls, spec: dict, arrays: dict[str, np.ndarray], dim: int) -> Novelty:
        """Rebuild from the head file; ValueError on anything that does not add up."""
        if not isinstance(spec, dict) or spec.get("method") != METHOD:
            raise ValueError(f"unknown novelty method {spec.get('method') if isinstance(spec, dict) else spec!r}")
        k, q = spec.get("k"), spec.get("quantile")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"novelty k {k!r}")
        if not isinstance(q, (int, float)) or isinstance(q, bool) or not 0 < q <= 1:
            raise ValueError(f"novelty quantile {q!r}")

        def arr(name: str, shape: tuple) -> np.ndarray:
            key = spec.get(name)
            a = arrays.get(key) if isinstance(key, str) else None
            if a is None or a.dtype.kind != "f" or a.ndim != len(shape) or not np.isfinite(a).all() \
                    or any(w is not None and w != n for w, n in zip(shape, a.shape, strict=True)):
                raise ValueError(f"novelty array {name!r} missing or malformed")
            return a

        sample = arr("sample", (None, dim))
        if len(sample) < 1 or k > len(sample):
            raise ValueError(f"novelty sample of {len(sample)} rows for k={k}")
        distances = arr("distances", (None,))
        if len(distances) < 1:
            raise ValueError("no novelty distances")
        return cls(sample.astype(np.float16), arr("center", (dim,)).astype(np.float32),
                   np.sort(distances.astype(np.float32)), k, float(q))


def fit_novelty(X: np.ndarray, seed: int = 0, max_sample: int | None = None, k: int = K,
                quantile: float = DEFAULT_QUANTILE) -> Novelty:
    """A ``Novelty`` of training embeddings ``X`` (see the module docstring).

    ``max_sample`` rows are kept (default: ``MAX_SAMPLE``, fewer for wide embeddings).
    """
    X = np.asarray(X, np.float32)
    if X.ndim != 2 or len(X) < 2:
        raise FeatXError(f"novelty needs at least 2 training embeddings, got shape {X.shape}")
    if max_sample is None:
        max_sample = min(MAX_SAMPLE, max(MIN_SAMPLE, MAX_SAMPLE_VALUES // X.shape[1]))
    rng = np.random.default_rng(seed)
    center = X.mean(axis=0)
    order = rng.permutation(len(X))
    picked = np.sort(order[:max_sample])
    S = _unit(X[picked], center).astype(np.float16)
    S32 = S.astype(np.float32)  # score against exactly what the head file will hold
    rest = order[max_sample:]
    if len(rest) >= MAX_THRESHOLD_ROWS // 2 or len(rest) >= len(picked):
        # enough rows outside the sample: they meet it exactly as new images will
        q_rows = np.sort(rest[:MAX_THRESHOLD_ROWS])
        d = _kth_distance(_unit(X[q_rows], center), S32, k)
    else:
        # small sets: every row against the others (itself left out), plus the rest
        d = _kth_distance(S32, S32, k, exclude=np.arange(len(picked)))
        if len(rest):
            d = np.concatenate([d, _kth_distance(_unit(X[rest], center), S32, k)])
    return Novelty(S, center.astype(np.float32), np.sort(d.astype(np.float32)), k, quantile)
