"""``featx sufficiency``: per-class learning curves from cached embeddings, and how many images
each class needs.

For several seeds, heads are fitted on nested subsets of the labelled table (the
5-a-class subset inside the 10-a-class one, ...) and each class's recall is measured
on held-out images (a ``test`` table, or a stratified share of the table kept out of
every subset). Per class, a power law in the number of images ``n`` is fitted to the
error, ``1 - recall(n) = a * n**-b + c`` (``c`` the floor the class levels off at;
Hestness et al. 2017 and Cortes et al. 1994 fit learning curves this way), and gives:

- the recall expected from doubling the class's images, with the spread over seeds
  (the same law fitted to each seed's curve);
- the images needed for ``target`` recall (None when the floor ``c`` is above it).

Where the extrapolation should not be trusted, the row says so in ``flags``:
``too-few-points`` (under 4 sizes: a 2-parameter law without a floor is fitted),
``flat`` (recall moved less than the seeds' noise over the measured range: more images
may not help, or the curve is all noise), ``far`` (the answer lies beyond 4x the largest
measured size), ``unreachable`` (the fitted floor is above the target), ``noisy-test``
(under 50 held-out images of the class: recall moves in big steps), ``all-images``
(the class has no more images than the largest size: its last points repeat one subset).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from featx.atomic import save_figure, write_text
from featx.csvout import csv_writer
from featx.embed.table import read_table
from featx.errors import FeatXError, MismatchError
from featx.heads.fit import encode_labels, make_head, one_blas_thread
from featx.progress import ProgressFn, no_progress
from featx.sampling import per_class_subset, stratified_split

__all__ = ["ClassCurve", "SufficiencyResult", "fit_power_law", "learning_curves", "sufficiency",
           "write_sufficiency"]

log = logging.getLogger(__name__)

MIN_POINTS = 4  # sizes a 3-parameter law needs to be more than a line through the points
FAR = 4.0  # extrapolating beyond this multiple of the largest measured size is flagged
NOISY_TEST = 50  # held-out images of a class below which its recall is flagged as coarse


@dataclass
class ClassCurve:
    """One class: the measured curve, the fitted law and what it predicts."""

    label: str
    images: int  # labelled images of the class in the table (training share)
    test_images: int
    sizes: list[int]
    recall_mean: list[float]
    recall_std: list[float]
    a: float
    b: float
    c: float  # error floor: recall levels off at 1 - c
    recall_now: float  # measured at the largest size
    recall_doubled: float  # predicted at twice the largest size
    doubled_low: float  # the range of that prediction over the seeds' own fits (and the mean's)
    doubled_high: float
    needed: int | None  # images for the target recall (None: unreachable per the fit)
    flags: list[str] = field(default_factory=list)

    def predict(self, n: float | np.ndarray) -> np.ndarray:
        return 1.0 - _law(np.asarray(n, float), self.a, self.b, self.c)


@dataclass
class SufficiencyResult:
    classes: list[ClassCurve]
    target: float
    seeds: int
    sizes: list[int]
    evaluated_on: str  # "test table <path>" or "held-out share of the table"
    C: float
    seconds: float
    files: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"target": self.target, "seeds": self.seeds, "sizes": self.sizes,
                "evaluated_on": self.evaluated_on, "C": self.C, "seconds": round(self.seconds, 2),
                "law": "1 - recall(n) = a * n**-b + c",
                "classes": [asdict(c) for c in self.classes],
                "files": {k: str(v) for k, v in self.files.items()}}


def _law(n, a, b, c):
    return a * np.power(n, -b) + c


def fit_power_law(n: np.ndarray, err: np.ndarray, sigma: np.ndarray | None = None,
                  floor: bool = True) -> tuple[float, float, float]:
    """(a, b, c) of ``err = a * n**-b + c`` by least squares (scipy's ``curve_fit``).

    Starts from the straight line through log(err) against log(n); ``floor=False`` (or a fit
    that fails) keeps that line (c = 0). ``c`` is bounded to [0, min(err)].
    """
    from scipy.optimize import curve_fit

    n = np.asarray(n, float)
    err = np.clip(np.asarray(err, float), 1e-4, 1.0)
    slope, icpt = np.polyfit(np.log(n), np.log(err), 1) if len(n) > 1 else (0.0, math.log(err[0]))
    a0, b0 = float(np.exp(icpt)), float(max(-slope, 0.0))
    if not floor or len(n) < MIN_POINTS:
        return a0, b0, 0.0
    s = None if sigma is None else np.maximum(np.asarray(sigma, float), 0.005)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p, _ = curve_fit(_law, n, err, p0=(a0, min(b0, 3.0), 0.0), sigma=s, maxfev=20000,
                             bounds=([0.0, 0.0, 0.0], [np.inf, 3.0, float(err.min())]))
        return float(p[0]), float(p[1]), float(p[2])
    except (RuntimeError, ValueError):
        return a0, b0, 0.0


def _needed(a: float, b: float, c: float, target: float) -> float | None:
    """Smallest n with predicted recall >= target, or None when the floor forbids it (or it
    would take over a billion images)."""
    gap = (1.0 - target) - c
    if gap <= 0 or a <= 0:
        return None if a > 0 or c > 1.0 - target else 1.0
    if b <= 1e-6:
        return None
    log_n = math.log(a / gap) / b
    return None if log_n > math.log(1e9) else max(1.0, math.exp(log_n))  # 1e9: never, in practice


def default_sizes(max_per_class: int, points: int = 8, smallest: int = 2) -> list[int]:
    """About ``points`` sizes per class, evenly spaced on a log scale from ``smallest``."""
    if max_per_class < smallest:
        return [max_per_class]
    return sorted({int(np.rint(v)) for v in np.geomspace(smallest, max_per_class, points)})


def learning_curves(X: np.ndarray, codes: np.ndarray, X_test: np.ndarray, codes_test: np.ndarray,
                    sizes: list[int], seeds: int, C: float, *, split: float | None = None,
                    progress: ProgressFn = no_progress) -> np.ndarray:
    """Recall of each class, shape (seeds, sizes, classes), from heads fitted on nested subsets.

    ``split`` holds out that share of each class for each seed instead of ``X_test`` (which
    is then ignored). For a seed the subsets are nested: each size adds images.
    """
    k = int(codes.max()) + 1
    out = np.full((seeds, len(sizes), k), np.nan)
    total, done = seeds * len(sizes), 0
    for s in range(seeds):
        if split is not None:
            tr, te = stratified_split(codes, split, seed=10_000 + s)
            Xs, cs, Xt, ct = X[tr], codes[tr], X[te], codes[te]
        else:
            Xs, cs, Xt, ct = X, codes, X_test, codes_test
        for j, n in enumerate(sizes):
            progress("curves", done, total)
            idx = per_class_subset(cs, n, seed=s)
            if len(np.unique(cs[idx])) < 2:
                done += 1
                continue
            head = make_head("logreg", C=C, seed=s)
            with one_blas_thread(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a tiny subset may not converge fully; it is one point
                head.fit(Xs[idx], cs[idx])
                pred = head.predict(Xt)
            for c in range(k):
                m = ct == c
                if m.any():
                    out[s, j, c] = float((pred[m] == c).mean())
            done += 1
    progress("curves", total, total)
    return out


def sufficiency(table: str | os.PathLike, *, test: str | os.PathLike | None = None, target: float = 0.9,
                sizes: list[int] | None = None, max_per_class: int | None = None, seeds: int = 3,
                C: float = 1.0, holdout: float = 0.3,
                progress: ProgressFn = no_progress) -> SufficiencyResult:
    """Learning curve and power-law fit per class of a labelled featx table (module docstring).

    ``test`` is a labelled table of held-out images (same backbone); without it ``holdout``
    of each class is kept out, per seed. ``sizes`` are images per class (default: 8 sizes on
    a log scale up to ``max_per_class``, itself by default the smallest class's training
    count). ``C`` is the logistic-regression head's; 1.0 is what fit-head picks most often
    on standardised embeddings, and one C for every size keeps the points comparable.
    """
    if not 0 < target < 1:
        raise FeatXError(f"--target is a recall between 0 and 1 (exclusive), got {target}")
    if seeds < 1:
        raise FeatXError(f"--seeds must be at least 1, got {seeds}")
    if test is None and not 0 < holdout < 1:
        raise FeatXError(f"holdout must be between 0 and 1, got {holdout}")
    t0 = time.perf_counter()
    path = Path(table)
    t = read_table(path)
    if not t.labelled or len(t) == 0:
        raise FeatXError(f"{path}: needs a label for every image (an ImageFolder tree or a listing "
                         "with a label column)")
    codes, classes = encode_labels(t.labels)
    counts = np.bincount(codes, minlength=len(classes))
    if len(classes) < 2:
        raise FeatXError(f"{path}: only one class ({classes[0]}); a learning curve needs two or more")
    ones = [classes[i] for i in np.flatnonzero(counts < 2)]
    if ones:
        raise FeatXError(f"{path}: class{'es' if len(ones) > 1 else ''} {', '.join(ones)} "
                         f"ha{'ve' if len(ones) > 1 else 's'} one image; a curve needs at least two")
    X_test, codes_test, split, train_counts, test_counts, where = _held_out(t, path, test, classes, codes,
                                                                            counts, holdout)
    cap = int(train_counts.min()) if max_per_class is None else int(max_per_class)
    sizes = sorted(set(sizes)) if sizes else default_sizes(cap)
    if sizes[0] < 1:
        raise FeatXError(f"sizes must be >= 1 image per class, got {sizes[0]}")
    rec = learning_curves(t.X, codes, X_test, codes_test, sizes, seeds, C, split=split,
                          progress=progress)
    progress("fit", 0, len(classes))
    curves = [_class_curve(classes[c], int(train_counts[c]), int(test_counts[c]), sizes, rec[:, :, c],
                           target) for c in range(len(classes))]
    progress("fit", len(classes), len(classes))
    return SufficiencyResult(curves, target, seeds, sizes, where, C, time.perf_counter() - t0)


def _held_out(t, path: Path, test, classes: list[str], codes: np.ndarray, counts: np.ndarray,
              holdout: float) -> tuple[np.ndarray, np.ndarray, float | None, np.ndarray, np.ndarray, str]:
    """Where recall is measured: (X_test, codes_test, split share or None, training and
    held-out counts per class, a description)."""
    if test is not None:
        tt = read_table(test)
        if tt.fingerprint and t.fingerprint and tt.fingerprint != t.fingerprint:
            raise MismatchError(f"{test} was extracted with another backbone ({tt.fingerprint}) than "
                                f"{path} ({t.fingerprint}); extract both with the same one")
        if not tt.labelled:
            raise FeatXError(f"{test}: the test table needs a label for every image")
        index = {c: i for i, c in enumerate(classes)}
        keep = [i for i, lbl in enumerate(tt.labels) if lbl in index]
        if not keep:
            raise FeatXError(f"{test}: none of its classes are in {path}")
        overlap = len(set(t.keys) & {tt.keys[i] for i in keep})
        if overlap:
            log.warning("%d images of %s are also in %s (same content); their recall is not held out",
                        overlap, test, path)
        X_test = tt.X[keep]
        codes_test = np.array([index[tt.labels[i]] for i in keep])
        train_counts, split = counts, None
        test_counts = np.bincount(codes_test, minlength=len(classes))
        where = f"test table {test}"
    else:
        X_test, codes_test, split = t.X[:0], codes[:0], holdout
        test_counts = np.array([min(round(k * holdout), k - 1) for k in counts])
        train_counts = counts - test_counts
        where = f"a held-out {holdout:.0%} of each class of the table, per seed"
    return X_test, codes_test, split, train_counts, test_counts, where


def _class_curve(label: str, images: int, test_images: int, sizes: list[int], rec: np.ndarray,
                 target: float) -> ClassCurve:
    """Fit one class's law to its mean curve (and to each seed's for the spread)."""
    # points beyond the class's own images repeat the same subset: keep the first of them
    usable = [j for j, n in enumerate(sizes) if n <= images or (j == 0 or sizes[j - 1] < images)]
    usable = [j for j in usable if not np.all(np.isnan(rec[:, j]))]
    n = np.array([min(sizes[j], images) for j in usable], float)
    mean = np.nanmean(rec[:, usable], axis=0)
    std = np.nanstd(rec[:, usable], axis=0)
    flags = []
    if len(n) < MIN_POINTS:
        flags.append("too-few-points")
    if sizes[-1] > images:
        flags.append("all-images")
    if test_images < NOISY_TEST:
        flags.append("noisy-test")
    a, b, c = fit_power_law(n, 1.0 - mean, sigma=std)
    # the seeds' spread where the curve ends (small subsets are noisier than the rise they show)
    noise = float(np.mean(std[len(std) // 2:])) if len(std) else 0.0
    rise = float(mean[-1] - mean[0]) if len(mean) > 1 else 0.0
    if len(mean) > 1 and rise <= max(2 * noise, 0.01):
        flags.append("flat")
    top = float(n[-1]) if len(n) else 1.0
    now = float(mean[-1]) if len(mean) else float("nan")
    # the law (fitted to every point, the noisy small subsets weighted down) predicts; anchoring
    # it at the last measured point instead lets that one point's noise move every prediction
    # (it was worse on a small Fashion-MNIST check: 4 classes, 20 -> 40 a class)
    doubled = float(1.0 - _law(2 * top, a, b, c))
    per_seed = []
    for s in range(rec.shape[0]):
        r = rec[s, usable]
        if np.all(np.isfinite(r)):
            per_seed.append(float(1.0 - _law(2 * top, *fit_power_law(n, 1.0 - r))))
    # reached already: the smallest measured size whose mean recall reaches the target
    need = _needed(a, b, c, target) if now < target else float(n[int(np.argmax(mean >= target))])
    if need is None:
        flags.append("unreachable")
    elif need > FAR * top:
        flags.append("far")
    return ClassCurve(label, images, test_images, [int(v) for v in n], [round(float(v), 4) for v in mean],
                      [round(float(v), 4) for v in std], a, b, c,
                      round(now, 4), round(min(doubled, 1.0), 4),
                      round(min(min([*per_seed, doubled]), 1.0), 4),
                      round(min(max([*per_seed, doubled]), 1.0), 4),
                      None if need is None else math.ceil(need), flags)


CSV_COLUMNS = ["class", "images", "test_images", "recall_now", "at_images", "recall_if_doubled",
               "doubled_low", "doubled_high", "images_for_target", "more_images_for_target", "a", "b", "c",
               "flags"]


def write_sufficiency(result: SufficiencyResult, out_dir: str | os.PathLike) -> SufficiencyResult:
    """Write ``sufficiency.csv``, ``sufficiency.json`` and ``sufficiency.png`` into ``out_dir``."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FeatXError(f"cannot create {out}: {e.strerror or e}") from None
    buf = io.StringIO(newline="")
    w = csv_writer(buf)
    w.writerow(CSV_COLUMNS)
    for c in result.classes:
        more = None if c.needed is None else max(0, c.needed - c.images)
        w.writerow([c.label, c.images, c.test_images, f"{c.recall_now:.4f}", c.sizes[-1] if c.sizes else "",
                    f"{c.recall_doubled:.4f}", f"{c.doubled_low:.4f}", f"{c.doubled_high:.4f}",
                    "" if c.needed is None else c.needed, "" if more is None else more,
                    f"{c.a:.5g}", f"{c.b:.5g}", f"{c.c:.5g}", " ".join(c.flags)])
    result.files["csv"] = write_text(out / "sufficiency.csv", buf.getvalue())
    result.files["png"] = _plot(result, out / "sufficiency.png")
    result.files["json"] = out / "sufficiency.json"
    write_text(result.files["json"], json.dumps(result.to_dict(), indent=2))
    return result


def _plot(result: SufficiencyResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    k = len(result.classes)
    cols = min(5, k)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[k:]:
        ax.axis("off")
    for ax, c in zip(axes.flat, result.classes, strict=False):
        n = np.array(c.sizes, float)
        if len(n) == 0:
            continue
        hi = max(n[-1] * 4, (c.needed or 0) * 1.2 if c.needed and c.needed <= n[-1] * 16 else 0)
        grid = np.geomspace(max(1.0, n[0]), hi, 100)
        ax.plot(grid, c.predict(grid), color="tab:blue", lw=1.2, label="fit")
        ax.axvspan(n[-1], hi, color="0.92", lw=0)  # extrapolated region
        ax.errorbar(n, c.recall_mean, yerr=c.recall_std, fmt="o", ms=3, color="black", lw=0.8)
        ax.axhline(result.target, color="tab:red", lw=0.8, ls="--")
        ax.plot([2 * n[-1]] * 2, [c.doubled_low, c.doubled_high], color="tab:orange", lw=3, alpha=0.7)
        if c.needed is not None and c.needed <= hi:
            ax.axvline(c.needed, color="tab:red", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        if c.needed is None:
            need = f"{result.target:.0%} unreachable"
        elif c.recall_now >= result.target:
            need = f"{result.target:.0%} reached at {c.needed}"
        else:
            need = f"{c.needed:,} for {result.target:.0%}" if c.needed < 1e6 else f"{c.needed:.1e} for {result.target:.0%}"
        title = f"{c.label}: {c.recall_now:.0%} -> {c.recall_doubled:.0%} x2\n{need}"
        shown = [f for f in c.flags if f != "unreachable"]
        if shown:
            title += f" [{', '.join(shown)}]"
        ax.set_title(title, fontsize=8, color="tab:red" if c.flags else "black")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, lw=0.5)
    for ax in axes[:, 0]:
        ax.set_ylabel("recall", fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("images of the class", fontsize=8)
    fig.suptitle(f"Per-class learning curves ({result.seeds} seeds, mean ± sd; grey: extrapolated; "
                 f"orange: x2 spread over seeds; red dashes: target {result.target:.0%})", fontsize=9)
    return save_figure(fig, path)
