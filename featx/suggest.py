"""``featx suggest``: which unlabelled images to label next (active learning on cached embeddings).

A head is fitted on the labelled table (the same logistic-regression head as
``featx fit-head``, C by cross-validation); it scores every pool image, and a
strategy picks the ``n`` to label next:

- ``margin`` (default): smallest gap between the two most probable classes.
- ``entropy``: largest entropy of the class probabilities.
- ``margin+diversity``: the ``CANDIDATES_PER_PICK * n`` least-margin images, clustered
  into ``n`` groups by k-means weighted by uncertainty; the image nearest each centre
  (Zhdanov 2019, "Diverse mini-batch active learning"). The ``n`` are then not near
  copies of each other.
- ``margin+coreset``: the same candidates, chosen by greedy k-centre (core-set, Sener &
  Savarese 2018): each pick the candidate farthest from everything labelled or picked.
- ``random``: a seeded uniform draw, the baseline to compare with.

Images whose content is already in the labelled table (same content key, whatever
the file's name) are never suggested, and a pool image that occurs twice is
suggested once. Every choice is seeded.

Why no active-learning library: scikit-activeml and modAL wrap a scikit-learn
estimator and re-fit it per query; the query rules themselves are a few lines of
numpy here (margin, entropy), and the one part worth a maintained implementation,
the clustering, is scikit-learn's ``KMeans`` (weighted, seeded). A dependency for
ten lines would also pin scikit-learn against featx's own choice.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.atomic import write_text
from featx.backbones.artifact import Backbone
from featx.backbones.resolve import table_backbone
from featx.csvout import csv_writer
from featx.embed.scan import is_table_file, output_path
from featx.embed.table import EmbeddingTable, image_paths, read_table
from featx.engines.files import collect_files, shared
from featx.errors import FeatXError, MismatchError
from featx.heads.fit import fit_head, one_blas_thread
from featx.heads.headfile import Head, load_head, proba_in_blocks
from featx.progress import ProgressFn, no_progress

__all__ = ["STRATEGIES", "Pool", "SuggestResult", "check_destination", "load_pool", "rank", "select", "suggest",
           "write_suggestions"]

log = logging.getLogger(__name__)

STRATEGIES = ("margin", "entropy", "margin+diversity", "margin+coreset", "random")
#: margin+diversity / margin+coreset cluster this many least-margin candidates per image asked
#: for (Zhdanov 2019 used 10: fewer loses diversity, more lets confident images in)
CANDIDATES_PER_PICK = 10


@dataclass
class Pool:
    """Unlabelled images and their embeddings (absolute paths; keys are content hashes)."""

    paths: list[str]
    keys: list[str]
    X: np.ndarray
    fingerprint: str
    failures: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class SuggestResult:
    """The images to label next, best first, with why each was chosen."""

    rows: list[dict]
    strategy: str
    seed: int
    classes: list[str]
    pool_size: int  # images in the pool (readable ones)
    already_labelled: int  # pool images whose content is in the labelled table
    repeats: int  # pool images whose content occurs earlier in the pool
    labelled: int  # rows of the labelled table
    head: dict  # C and CV score of the head that scored the pool
    seconds: dict  # per stage
    failures: list[tuple[str, str]] = field(default_factory=list)
    csv: Path | None = None
    to_label: Path | None = None

    def summary(self) -> dict:
        return {"strategy": self.strategy, "seed": self.seed, "suggested": len(self.rows),
                "pool": self.pool_size, "already_labelled": self.already_labelled,
                "repeats_in_pool": self.repeats, "labelled": self.labelled, "classes": self.classes,
                "head": self.head, "seconds": self.seconds,
                "failures": [{"path": output_path(p), "reason": r} for p, r in self.failures],
                "csv": str(self.csv) if self.csv else None,
                "to_label": str(self.to_label) if self.to_label else None}


# ---------------------------------------------------------------- the pool

def _is_embeddings_table(p: Path) -> bool:
    if p.suffix.lower() != ".parquet" and not p.is_dir():
        return False
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(p).names if p.is_file() else []
    except Exception:
        return False
    return "embedding" in names


def load_pool(pool: str | os.PathLike, bb: Backbone, *, store: str | os.PathLike | None = None,
              device: str = "auto", batch_size: int = 32, workers: int | None = None,
              progress: ProgressFn = no_progress) -> Pool:
    """The pool's embeddings: a featx table as it is, a folder or listing embedded with ``bb``.

    Folders and listings go through the embedding store (``featx.engines.files.embed_paths``), so
    images already extracted are not run again and the ones embedded here are cached for the
    ``featx extract`` of the next round.
    """
    p = Path(pool)
    if not p.exists():
        raise FeatXError(f"{p}: no such pool (a folder, a listing or a featx table)")
    if p.is_file() and _is_embeddings_table(p):
        t = read_table(p)
        paths = [q if "://" in q else os.path.abspath(q) for q in image_paths(t, p)]
        X = t.X if t.X is not None else np.zeros((0, bb.dim), np.float32)
        return Pool(paths, list(t.keys), X, t.fingerprint)
    if not (p.is_dir() or is_table_file(p)):
        raise FeatXError(f"{p}: not a folder, a listing (CSV/TSV/Parquet with a path column) or a "
                         "featx table")
    files, _, skipped = collect_files([p])
    if not files:
        return Pool([], [], np.zeros((0, bb.dim), np.float32), bb.fingerprint, list(skipped))
    X, keys, ok, failures = _embed_files(files, bb, store=store, device=device, batch_size=batch_size,
                                         workers=workers, data_root=p if p.is_dir() else None,
                                         progress=progress)
    # absolute paths: next.csv is a listing that `featx extract next.csv` reads from its own folder
    paths = [f if "://" in f else os.path.abspath(f) for f in (files[i] for i in ok)]
    return Pool(paths, keys, X, bb.fingerprint, list(skipped) + failures)


def _embed_files(files: list[str], bb: Backbone, *, store: str | os.PathLike | None, device: str,
                 batch_size: int, workers: int | None, data_root: Path | None,
                 progress: ProgressFn) -> tuple[np.ndarray, list[str], list[int], list[tuple[str, str]]]:
    """(embeddings, content keys, indices of the readable files, failures) through the store."""
    done = shared(bb, device, store).files(files, batch_size=batch_size, workers=workers,
                                           data_root=data_root, progress=progress)
    ok = done.ok
    return done.rows(), [str(done.keys[i]) for i in ok], ok, list(done.failures)


# ---------------------------------------------------------------- scoring and choice

def margins(proba: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row (1 for a single class)."""
    if proba.shape[1] < 2:
        return np.ones(len(proba))
    top2 = np.partition(proba, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def entropies(proba: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row."""
    from scipy.stats import entropy

    return entropy(proba.T) if len(proba) else np.zeros(0)


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def select(proba: np.ndarray, n: int, strategy: str = "margin", *, seed: int = 0,
           X: np.ndarray | None = None, X_labelled: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Choose ``n`` rows of a pool from the head's probabilities: (indices best first, cluster).

    ``X`` (the pool's embeddings) is needed by the diversity strategies, ``X_labelled`` by
    margin+coreset (distances to what is labelled already). ``cluster`` is the k-means group
    of each pick for margin+diversity and -1 otherwise. Ties keep pool order.
    """
    if strategy not in STRATEGIES:
        raise FeatXError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    m = len(proba)
    if not 0 < n <= m:
        raise FeatXError(f"cannot choose {n} of {m} images")
    none = np.full(n, -1)
    if strategy == "random":
        return np.random.default_rng(seed).choice(m, size=n, replace=False), none
    if strategy == "entropy":
        return np.argsort(-entropies(proba), kind="stable")[:n], none
    order = np.argsort(margins(proba), kind="stable")
    if strategy == "margin":
        return order[:n], none
    if X is None:
        raise FeatXError(f"{strategy} needs the pool's embeddings")
    cand = order[:min(m, CANDIDATES_PER_PICK * n)]
    if len(cand) == n:
        return cand, none
    U = _unit(X[cand])
    if strategy == "margin+coreset":
        return cand[_k_centre(U, n, None if X_labelled is None else _unit(X_labelled))], none
    from sklearn.cluster import KMeans

    # weighted k-means (Zhdanov 2019): uncertain candidates pull the centres towards them
    weight = 1.0 - margins(proba[cand]) + 1e-6
    with one_blas_thread():
        km = KMeans(n_clusters=n, n_init=1, random_state=seed).fit(U, sample_weight=weight)
    d = ((U - km.cluster_centers_[km.labels_]) ** 2).sum(axis=1)
    picks, groups = [], []
    for c in range(n):
        members = np.flatnonzero(km.labels_ == c)
        if len(members):
            picks.append(members[np.argmin(d[members])])
            groups.append(c)
    # an empty cluster (rare) is filled with the least-margin candidates not picked
    taken = set(picks)
    rest = [i for i in range(len(cand)) if i not in taken]
    while len(picks) < n:
        picks.append(rest.pop(0))
        groups.append(-1)
    # best first: the most uncertain pick leads
    pos = np.argsort(np.asarray(picks), kind="stable")  # cand is in margin order already
    return cand[np.asarray(picks)[pos]], np.asarray(groups)[pos]


def _k_centre(U: np.ndarray, n: int, L: np.ndarray | None) -> np.ndarray:
    """Greedy k-centre over unit rows ``U``: each pick is farthest from everything chosen so far."""
    if L is not None and len(L):
        dist = np.full(len(U), np.inf)
        for s in range(0, len(L), 4096):  # blocks: memory flat for big labelled tables
            dist = np.minimum(dist, 1.0 - (U @ L[s:s + 4096].T).max(axis=1))
        first = int(np.argmax(dist))
    else:
        first = 0  # the least-margin candidate
        dist = np.full(len(U), np.inf)
    picks = [first]
    dist = np.minimum(dist, 1.0 - U @ U[first])
    for _ in range(n - 1):
        dist[picks] = -np.inf
        nxt = int(np.argmax(dist))
        picks.append(nxt)
        dist = np.minimum(dist, 1.0 - U @ U[nxt])
    return np.asarray(picks)


# ---------------------------------------------------------------- the job

def _labelled_table(labelled: str | os.PathLike) -> tuple[EmbeddingTable, Path]:
    path = Path(labelled)
    t = read_table(path)
    if len(t) == 0:
        raise FeatXError(f"{path}: the labelled table is empty; extract a folder with at least two "
                         "labelled images per class")
    if not t.labelled:
        raise FeatXError(f"{path}: some images have no label; the labelled table needs a class for "
                         "every image (an ImageFolder tree or a listing with a label column)")
    classes, counts = np.unique(np.asarray(t.labels), return_counts=True)
    if len(classes) < 2:
        raise FeatXError(f"{path}: only one class ({classes[0]}); label images of at least two classes")
    ones = [str(c) for c, k in zip(classes, counts, strict=True) if k < 2]
    if ones:
        raise FeatXError(f"{path}: class{'es' if len(ones) > 1 else ''} {', '.join(ones)} "
                         f"ha{'ve' if len(ones) > 1 else 's'} one image; label at least one more of "
                         "each (a head needs two per class)")
    return t, path


def suggest(pool: str | os.PathLike, labelled: str | os.PathLike, n: int, *, strategy: str = "margin",
            seed: int = 0, C: float | str = "auto", head: str | os.PathLike | Head | None = None,
            backbone: str | os.PathLike | Backbone | None = None,
            store: str | os.PathLike | None = None, device: str = "auto", batch_size: int = 32,
            workers: int | None = None, progress: ProgressFn = no_progress) -> SuggestResult:
    """Choose the ``n`` images of ``pool`` to label next (see the module docstring).

    ``pool`` is a folder, a listing (CSV/TSV/Parquet with a ``path`` column) or a featx
    table; ``labelled`` is the featx table of the images labelled so far. Nothing is written:
    ``write_suggestions`` writes the CSV and the ``to_label/`` folder. ``head`` (a head file of
    the labelled table, as ``featx fit-head`` wrote it) scores the pool instead of a head
    fitted here: the seconds of cross-validation are then skipped. It must come from the
    table's backbone.
    """
    if strategy not in STRATEGIES:
        raise FeatXError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if n < 1:
        raise FeatXError(f"-n must be at least 1, got {n}")
    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    lab, lab_path = _labelled_table(labelled)
    bb = table_backbone(lab.meta, lab_path, backbone)
    pl = load_pool(pool, bb, store=store, device=device, batch_size=batch_size, workers=workers,
                   progress=progress)
    secs["pool"] = time.perf_counter() - t0
    if pl.fingerprint and lab.fingerprint and pl.fingerprint != lab.fingerprint:
        raise MismatchError(f"{pool} was extracted with another backbone (fingerprint {pl.fingerprint}) "
                            f"than {lab_path} ({lab.fingerprint}); extract the pool with the labelled "
                            "table's backbone, or pass the pool's folder")
    if len(pl.paths) == 0:
        raise FeatXError(f"{pool}: the pool has no readable images")
    if pl.X.shape[1] != lab.X.shape[1]:
        raise MismatchError(f"{pool} has {pl.X.shape[1]}-dim embeddings, {lab_path} "
                            f"{lab.X.shape[1]}-dim; extract both with the same backbone")
    cand, already, repeats = _candidates(pl, lab, pool, lab_path, n)
    cand_idx = np.asarray(cand)
    t1 = time.perf_counter()
    # the whole pool, not a copy of it (1 GB at 50,000 x 4,880), when every row is a candidate
    Xc = pl.X if len(cand_idx) == len(pl.X) else pl.X[cand_idx]
    h = None if head is None else _head_file(head, lab, lab_path)
    picks, groups, proba, rep = rank(lab.X, lab.labels, Xc, n, strategy, seed=seed, C=C, head=h,
                                     progress=progress)
    secs["fit+choose"] = time.perf_counter() - t1
    classes = rep["classes"]
    mar, ent = margins(proba[picks]), entropies(proba[picks])
    rows = []
    for r, (j, g) in enumerate(zip(picks, groups, strict=True)):
        i = int(cand_idx[j])
        top = np.argsort(-proba[j], kind="stable")[:2]
        rows.append({"rank": r + 1, "path": pl.paths[i], "key": pl.keys[i],
                     "reason": _reason(strategy, float(mar[r]), float(ent[r]), int(g),
                                       classes[top[0]], classes[top[1]] if len(top) > 1 else ""),
                     "margin": float(mar[r]), "entropy": float(ent[r]),
                     "predicted": classes[top[0]], "probability": float(proba[j, top[0]]),
                     "runner_up": classes[top[1]] if len(top) > 1 else "",
                     "runner_up_probability": float(proba[j, top[1]]) if len(top) > 1 else 0.0,
                     "cluster": int(g)})
    secs["total"] = time.perf_counter() - t0
    head = {"C": rep.get("C"), "cv_score": rep.get("cv_score_mean")}
    return SuggestResult(rows, strategy, seed, classes, len(pl.paths), already, repeats, len(lab),
                         head, {k: round(v, 3) for k, v in secs.items()}, pl.failures)


def rank(X_labelled: np.ndarray, labels, X_pool: np.ndarray, n: int, strategy: str = "margin", *,
         seed: int = 0, C: float | str = "auto", head: Head | None = None,
         progress: ProgressFn = no_progress) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The core of ``suggest`` on arrays: fit the head on the labelled rows (or take ``head``),
    score the pool rows (all unlabelled), choose ``n``. Returns (picks best first, k-means
    group, pool probabilities, the head's report with ``classes``)."""
    if head is None:
        pipe, rep = fit_head(X_labelled, labels, C=C, seed=seed, progress=progress)
    else:
        pipe = head.pipeline
        rep = {"classes": head.class_columns(), "C": (head.meta.get("train") or {}).get("C"),
               "cv_score_mean": (head.meta.get("train") or {}).get("cv_score_mean")}
    progress("score", 0, len(X_pool))
    with one_blas_thread():
        proba = head.proba(X_pool) if head is not None else \
            proba_in_blocks(pipe, X_pool)
    progress("score", len(X_pool), len(X_pool))
    progress(strategy, 0, n)
    picks, groups = select(proba, n, strategy, seed=seed, X=X_pool, X_labelled=X_labelled)
    progress(strategy, n, n)
    rep["pipeline"] = pipe
    return picks, groups, proba, rep


def _candidates(pl: Pool, lab: EmbeddingTable, pool, lab_path: Path, n: int) -> tuple[list[int], int, int]:
    """Pool rows whose content is not labelled yet, each content once: (rows, labelled, repeats)."""
    known = set(lab.keys)
    seen: set[str] = set()
    cand, already, repeats = [], 0, 0
    for i, k in enumerate(pl.keys):
        if k in known:
            already += 1
        elif k in seen:
            repeats += 1
        else:
            seen.add(k)
            cand.append(i)
    if not cand:
        raise FeatXError(f"{pool}: all {len(pl.paths)} images are already in {lab_path} (matched by "
                         "content); nothing left to suggest")
    if n > len(cand):
        raise FeatXError(f"-n {n} is more than the {len(cand)} unlabelled images in {pool} "
                         f"({already} of its {len(pl.paths)} are labelled already); ask for at most "
                         f"{len(cand)}")
    return cand, already, repeats


def _head_file(head: str | os.PathLike | Head, lab: EmbeddingTable, lab_path: Path) -> Head:
    """The head file given to suggest, checked against the labelled table."""
    h = head if isinstance(head, Head) else load_head(head)
    if h.fingerprint != lab.fingerprint:
        raise MismatchError(f"head {h.path or ''} was trained on backbone fingerprint {h.fingerprint}, "
                            f"{lab_path} has {lab.fingerprint}; fit a head on this table "
                            "(featx fit-head) or leave --head out")
    trained_on = (h.meta.get("train") or {}).get("embeddings")
    if trained_on and Path(str(trained_on)) != lab_path.resolve():
        log.warning("head %s was fitted on %s, not on %s: its view of what is uncertain may be "
                    "out of date", h.path, trained_on, lab_path)
    return h


def _reason(strategy: str, margin: float, entropy: float, group: int, first: str, second: str) -> str:
    if strategy == "random":
        return "random draw (baseline)"
    between = f"{first} vs {second}"
    if strategy == "entropy":
        return f"high entropy {entropy:.2f} ({between})"
    text = f"low margin {margin:.3f} ({between})"
    if strategy == "margin+diversity" and group >= 0:
        text += f"; nearest the centre of group {group}"
    elif strategy == "margin+coreset":
        text += "; far from everything labelled or chosen"
    return text


# ---------------------------------------------------------------- writing

CSV_COLUMNS = ["rank", "path", "label", "reason", "margin", "entropy", "predicted", "probability",
               "runner_up", "runner_up_probability", "cluster", "key", "copy"]


def write_suggestions(result: SuggestResult, out: str | os.PathLike, *, layout: str = "copy") -> SuggestResult:
    """Write ``out`` (CSV: the images best first, an empty ``label`` column to fill, the reasons)
    and, unless ``layout="none"``, a ``to_label/`` folder beside it holding a copy (or a
    symbolic link, ``layout="link"``) of each image, named ``<rank>_<name>``, with one empty
    sub-folder per known class to sort them into.

    A copy has the same bytes, hence the same content key: moved into the training folder,
    ``featx extract`` finds its embedding in the store. ``to_label/`` must be new or empty
    (it is not overwritten: it may hold an earlier round's sorting).
    """
    out, folder = check_destination(out, layout)
    names: list[str] = [""] * len(result.rows)
    if layout != "none":
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for c in result.classes:
                (folder / _safe(c)).mkdir(exist_ok=True)
            for r, row in enumerate(result.rows):
                if "://" in row["path"]:  # a URL pool row: nothing local to copy, the CSV names it
                    continue
                src = Path(row["path"])
                dst = folder / f"{row['rank']:04d}_{_safe(src.name)}"
                if layout == "link":
                    dst.symlink_to(src.resolve())
                else:
                    shutil.copy2(src, dst)
                names[r] = str(dst)
        except OSError as e:
            raise FeatXError(f"cannot write {folder}: {e.strerror or e} ({e.filename})") from None
    buf = io.StringIO(newline="")
    w = csv_writer(buf, delimiter="\t" if out.suffix.lower() == ".tsv" else ",")
    w.writerow(CSV_COLUMNS)
    for row, name in zip(result.rows, names, strict=True):
        w.writerow([row["rank"], output_path(row["path"]), "", row["reason"], f"{row['margin']:.6f}",
                    f"{row['entropy']:.6f}", row["predicted"], f"{row['probability']:.6f}",
                    row["runner_up"], f"{row['runner_up_probability']:.6f}", row["cluster"], row["key"],
                    output_path(name) if name else ""])
    result.csv = write_text(out, buf.getvalue())
    result.to_label = folder if layout != "none" else None
    return result


def check_destination(out: str | os.PathLike, layout: str = "copy") -> tuple[Path, Path]:
    """(CSV path, ``to_label/`` beside it), checked before any work: a .csv/.tsv name, a folder
    that can be made, and a ``to_label/`` that is new or empty (an earlier round's is kept)."""
    if layout not in ("copy", "link", "none"):
        raise FeatXError(f"layout {layout!r} is not one of copy, link, none")
    out = Path(out)
    if out.suffix.lower() not in (".csv", ".tsv"):
        raise FeatXError(f"{out}: the suggestions are written as CSV or TSV; name a .csv or .tsv file")
    folder = out.parent / "to_label"
    if layout != "none" and folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FeatXError(f"{folder} already holds files (an earlier round?); sort or move them, "
                         "or write this round elsewhere with --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FeatXError(f"cannot create {out.parent}: {e.strerror or e}") from None
    return out, folder


def _safe(name: str) -> str:
    """A file or folder name without path separators (class names come from data)."""
    s = "".join("_" if ch in "/\\\0" else ch for ch in str(name)).strip()
    return s if s not in ("", ".", "..") else "_"
