"""``featx audit``: wrong labels, near copies, leakage and outliers of an embeddings table.

Everything is computed from the cached embeddings before anything is written, so a
refused input (see ``audit``) leaves ``out_dir`` as it was; each file is then written
atomically.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.atomic import write_text
from featx.audit.labels import K_VOTE, knn_proba, label_issues
from featx.audit.outliers import K_OUTLIER, outliers
from featx.audit.page import render_page
from featx.csvout import csv_writer
from featx.embed.scan import output_path
from featx.embed.table import EmbeddingTable, image_paths
from featx.embed.table_checks import require_finite
from featx.errors import FeatXError
from featx.heads.oof import OOFResult, oof_proba
from featx.progress import ProgressFn, no_progress
from featx.similarity.near_duplicates import DuplicatesResult, duplicates
from featx.similarity.tables import check_same_backbone, load_table
from featx.similarity.topk import search

log = logging.getLogger(__name__)

__all__ = ["FILES", "AuditResult", "audit"]

#: weight of the neighbours' leave-one-out vote beside the logistic head's out-of-fold
#: probabilities (see docs/audit.md for what each gave on Fashion-MNIST with planted noise)
VOTE_WEIGHT = 0.25
PROBABILITIES = (f"{1 - VOTE_WEIGHT:g} x logistic out-of-fold + {VOTE_WEIGHT:g} x leave-one-out vote of the "
                 f"{K_VOTE} nearest images")
FILES = {"labels": "label_issues.csv", "duplicates": "duplicates.csv", "outliers": "outliers.csv",
         "html": "audit.html", "summary": "audit.json"}


@dataclass
class AuditResult:
    """What ``audit`` found and wrote: ``summary`` (counts, the threshold and why, timings),
    the ranked rows of each finding, and the files."""

    out_dir: Path
    summary: dict
    label_rows: list[dict]
    duplicates: DuplicatesResult
    leaks: DuplicatesResult | None
    outlier_rows: list[dict]
    oof: OOFResult
    files: list[Path] = field(default_factory=list)


def _csv(columns: list[str], rows: list[dict]) -> str:
    """The rows as CSV; their ``path*`` columns hold files (``_files``), written absolute."""
    buf = io.StringIO(newline="")
    w = csv_writer(buf)
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r[c] is None else f"{r[c]:.6f}" if isinstance(r[c], float) else
                    output_path(r[c]) if c.startswith("path") else r[c] for c in columns])
    return buf.getvalue()


def _files(rows: list[dict], files_of: dict[str, str]) -> list[dict]:
    """``rows`` with their table path (relative to the table's data root) as the file it names."""
    return [{**r, "path": files_of[r["path"]]} for r in rows]


def _nearest_distinct(res, keys: list[str]) -> np.ndarray:
    """Each row's similarity to its nearest hit that is another file (another content key)."""
    k = np.asarray(keys, dtype=object)
    other = (res.index != np.arange(len(keys))[:, None]) & (k[res.index] != k[:, None])
    first = np.argmax(other, axis=1)
    sim = res.similarity[np.arange(len(keys)), first].astype(np.float32)
    return np.where(other.any(axis=1), sim, np.float32(-2.0))


def _pairs(d: DuplicatesResult, t: EmbeddingTable, u: EmbeddingTable | None, v_files: list[str]) -> list[dict]:
    """``v_files``: where the images of the second table (``u``, else ``t``) are."""
    v = t if u is None else u
    return [{"scope": "within" if u is None else "test", "path_a": t.paths[a], "label_a": t.labels[a],
             "path_b": v.paths[b], "label_b": v.labels[b], "file_b": v_files[b],
             "similarity": float(s), "identical": bool(same)}
            for a, b, s, same in zip(d.a.tolist(), d.b.tolist(), d.similarity, d.identical, strict=True)]


def audit(table: str | os.PathLike | EmbeddingTable, test: str | os.PathLike | EmbeddingTable | None = None,
          out_dir: str | os.PathLike = "audit", *, threshold: float | None = None, per_image: int = 20,
          cv: int | None = None, seed: int = 0, backbone=None, store: str | os.PathLike | None = None,
          device: str = "auto", relabel: str | os.PathLike | None = None,
          progress: ProgressFn = no_progress) -> AuditResult:
    """Audit a labelled embeddings table; write the findings into ``out_dir``.

    * ``label_issues.csv``: every image, most likely mislabelled first (cleanlab's
      confident learning on out-of-fold probabilities of a logistic head,
      ``featx.heads.oof``), with the suggested class and cleanlab's own cut (``flagged``);
    * ``duplicates.csv``: near-duplicate pairs within the table (``scope`` within) and
      between ``test`` and the table (``scope`` test: leakage), at ``threshold``, or at
      the threshold calibrated on the table's own images (``featx.copy_threshold``);
    * ``outliers.csv``: every image, farthest from its nearest neighbours first;
    * ``audit.html``: the findings with thumbnails and a correction picker that downloads
      ``relabel.csv`` for ``featx fit-head --relabel``; ``audit.json``: the summary.

    ``relabel``: a ``relabel.csv`` applied to the table first (as ``featx fit-head --relabel``
    does), to check that the corrections took the issues away.

    Refused before anything is written (``FeatXError``): an unlabelled table, NaN/inf
    embeddings, a class with one image, a ``test`` table of another backbone, a relabel
    file naming paths not in the table or labels that are not classes.
    """
    t0 = time.perf_counter()
    t, name, u, u_name, fixes, t_files = _inputs(table, test, threshold, relabel)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FeatXError(f"{out} exists and is not a folder; pass --out DIR")
    times: dict[str, float] = {}

    tick = time.perf_counter()
    res = search(t.X, t.X, min(max(per_image, K_OUTLIER, K_VOTE) + 1, len(t)), progress=progress)
    times["search"] = time.perf_counter() - tick
    tick = time.perf_counter()
    oof = oof_proba(t.X, t.labels, cv=cv, seed=seed, progress=progress)
    proba = (1 - VOTE_WEIGHT) * oof.proba + VOTE_WEIGHT * knn_proba(res.index, oof.codes, len(oof.classes))
    rows = label_issues(proba, oof.codes, oof.classes, t.paths)
    times["labels"] = time.perf_counter() - tick

    tick = time.perf_counter()
    calibration = None
    if threshold is None:
        from featx.copy_threshold import calibrate_threshold

        calibration = calibrate_threshold(t, name=name, backbone=backbone, store=store, device=device,
                                          distinct_sim=_nearest_distinct(res, t.keys), seed=seed,
                                          progress=progress)
        threshold = calibration.threshold
    times["threshold"] = time.perf_counter() - tick
    tick = time.perf_counter()
    dups = duplicates(t, None, threshold, per_image=per_image, searched=res, progress=progress)
    leaks = duplicates(t, u, threshold, per_image=per_image, progress=progress) if u is not None else None
    outs = outliers(res.index, res.similarity, t.paths, t.labels)
    times["duplicates_outliers"] = time.perf_counter() - tick

    pairs = _pairs(dups, t, None, t_files)
    leak_pairs = _pairs(leaks, t, u, image_paths(u, test)) if leaks is not None else []
    summary = _summary(name, u_name, t, u, oof, rows, threshold, calibration, pairs, dups, leaks, outs, fixes)
    files_of = dict(zip(t.paths, t_files, strict=True))
    page = render_page(summary, oof.classes, [r for r in rows if r["flagged"]], pairs, leak_pairs, outs, files_of)
    times["total"] = time.perf_counter() - t0
    summary["seconds"] = {k: round(v, 3) for k, v in times.items()}
    # the CSVs name files, as every featx output does (absolute), not paths under a data root
    files = _write(out, _files(rows, files_of), [{**p, "path_a": files_of[p["path_a"]], "path_b": p["file_b"]}
                                                for p in pairs + leak_pairs], _files(outs, files_of), page, summary)
    return AuditResult(out, summary, rows, dups, leaks, outs, oof, files)


def _summary(name, u_name, t, u, oof, rows, threshold, calibration, pairs, dups, leaks, outs, fixes) -> dict:
    """``audit.json``'s findings (the timings are added by ``audit``)."""
    return {
        "table": name, "test": u_name, "rows": len(t), "classes": oof.classes,
        "label_issues": sum(r["flagged"] for r in rows),
        "oof": oof.summary(), "probabilities": PROBABILITIES,
        "threshold": {"value": float(threshold),
                      "why": calibration.reason if calibration is not None else "given (--threshold)",
                      "calibration": calibration.summary() if calibration is not None else None},
        "duplicate_pairs": len(pairs), "duplicate_clusters": len(dups.clusters),
        "leaked": leaks.leaked if leaks is not None else None,
        "leaked_other_label": leaks.leaked_other_label if leaks is not None else None,
        "test_rows": len(u) if u is not None else None,
        "outliers": sum(r["flagged"] for r in outs),
        "relabel": None if fixes is None else {k: fixes[k] for k in ("file", "relabelled", "dropped")},
    }


def _inputs(table, test, threshold, relabel) -> tuple[EmbeddingTable, str, EmbeddingTable | None,
                                                     str | None, dict | None, list[str]]:
    """The table (corrected by ``relabel``) and the test table, checked (labels, finite rows,
    one backbone); the relabel record; where the table's images are (``image_paths``)."""
    t, name = load_table(table)
    fixes = None
    if relabel is not None:
        from featx.relabel import apply_relabel, read_relabel

        keep, labels, fixes = apply_relabel(read_relabel(relabel), t.paths, t.labels,
                                            root=t.meta.get("root"), table=name)
        t = EmbeddingTable([t.paths[i] for i in keep], labels, [t.keys[i] for i in keep], t.X[keep], t.meta)
    if not t.labelled:
        raise FeatXError(f"{name}: the images have no labels; audit a table extracted from an "
                         "ImageFolder tree (root/<class>/<image>)")
    require_finite(t, name)
    u, u_name = None, None
    if test is not None:
        u, u_name = load_table(test)
        check_same_backbone(t, name, u, u_name)
        require_finite(u, u_name)
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise FeatXError(f"threshold is a cosine similarity, between -1 and 1; got {threshold}")
    return t, name, u, u_name, fixes, image_paths(t, table)


def _write(out: Path, rows: list[dict], pairs: list[dict], outs: list[dict], page: str,
           summary: dict) -> list[Path]:
    """Every file, each atomically, once everything is computed."""
    texts = {
        FILES["labels"]: _csv(["rank", "path", "given", "suggested", "score", "flagged"], rows),
        FILES["duplicates"]: _csv(["scope", "path_a", "label_a", "path_b", "label_b", "similarity",
                                   "identical"], pairs),
        FILES["outliers"]: _csv(["rank", "path", "label", "distance", "percentile", "z", "flagged"], outs),
        FILES["html"]: page,
        FILES["summary"]: json.dumps(summary, indent=2),
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FeatXError(f"cannot create {out}: {e.strerror or e}") from None
    return [write_text(out / n, text) for n, text in texts.items()]
