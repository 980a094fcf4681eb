"""``featx compare --backbones a,b --features last,multi``: which frozen features to use.

Every combination of backbone, feature recipe (featx.backbones.features) and
crop is one frozen probe: embeddings through the store (cached, so adding a
backbone to a second run only extracts that one), a standardised logistic
regression with C chosen by stratified cross-validation on the training
images, scored by that CV accuracy, with the extraction time per image and,
where a test folder is given, the test accuracy. The report (``features.md``,
``features.json``, ``features.png``) names the combination to use and the
commands that make it.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.atomic import figure, write_text
from featx.backbones.cards import CROPS, DEFAULT_BACKBONE
from featx.backbones.features import FEATURES
from featx.errors import FeatXError
from featx.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)

# CV accuracies this close (a tenth of a point) are a tie, which goes to the faster extraction
TIE = 0.001


@dataclass
class FeatureComparison:
    rows: list[dict]
    best: dict
    out: Path
    config: dict
    files: dict = field(default_factory=dict)


def parse_choices(spec: str | list | tuple, allowed: tuple[str, ...] | None, what: str) -> tuple[str, ...]:
    """'a, b' -> ('a', 'b'), each checked against ``allowed`` (None: anything)."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    bad = [s for s in items if allowed is not None and s not in allowed]
    if bad or not items:
        raise FeatXError(f"--{what}: {', '.join(bad) or 'nothing given'}; expected a comma-separated list"
                         + (f" of {', '.join(allowed)}" if allowed else ""))
    return tuple(dict.fromkeys(items))


def compare_features(train, test=None, *, backbones=(DEFAULT_BACKBONE,), features=FEATURES,
                     crops=("center",), out: str | os.PathLike = "report", cv: int = 5, seed: int = 0,
                     device: str = "auto", store: str | os.PathLike | None = None, batch_size: int = 32,
                     workers: int | None = None, test_per_class: int | None = None,
                     progress: ProgressFn = no_progress) -> FeatureComparison:
    """Score every (backbone, features, crop) as a frozen probe on ``train``; see the module docstring.

    ``train`` and ``test`` are ImageFolder directories or (paths, labels) pairs;
    ``test_per_class`` caps the test images a class. Returns the rows (one per
    combination, in the order given), the recommended one and the report files.
    """
    from featx.finetune.data import labelled_files
    from featx.sampling import per_class_subset

    combos = list(itertools.product(parse_choices(backbones, None, "backbones"),
                                     parse_choices(features, FEATURES, "features"),
                                     parse_choices(crops, CROPS, "crops")))
    files = labelled_files(train)
    testf = None if test is None else labelled_files(test, classes=files.classes)
    if testf is not None and test_per_class is not None:
        testf = testf.subset(per_class_subset(testf.labels, test_per_class, seed))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"train": str(train) if isinstance(train, (str, os.PathLike)) else None,
              "train_images": len(files), "classes": files.classes, "cv_folds": cv, "seed": seed,
              "test_images": len(testf) if testf is not None else 0, "device": device}
    done = finished_rows(out / "features.json", config)
    rows: list[dict] = []
    for i, (name, feat, crop) in enumerate(combos):
        if (name, feat, crop) in done:  # a rerun after Ctrl-C keeps what was finished
            rows.append(done[(name, feat, crop)])
            continue
        try:
            rows.append(score_probe(name, feat, crop, files, testf, cv=cv, seed=seed, device=device,
                                    store=store, batch_size=batch_size, workers=workers,
                                    progress=_numbered(progress, i + 1, len(combos))))
        except FeatXError as e:  # one backbone that cannot be had costs its row, not the others'
            log.warning("%s %s crop=%s: %s", name, feat, crop, e)
            rows.append({"backbone": name, "features": feat, "crop": crop, "error": str(e)})
        write_text(out / "features.json", json.dumps({"config": config, "rows": rows}, indent=2))  # partial
    scored = [r for r in rows if "error" not in r]
    if not scored:
        raise FeatXError("no combination could be scored: " + "; ".join(
            f"{r['backbone']} {r['features']} crop={r['crop']}: {r['error']}" for r in rows))
    best = recommend(scored)
    result = FeatureComparison(rows, best, out, config)
    result.files = write_features_report(result)
    return result


def finished_rows(path: Path, config: dict) -> dict[tuple[str, str, str], dict]:
    """Rows a previous run with the same settings finished (its partial features.json)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("config") != config:
        return {}
    return {(r["backbone"], r["features"], r["crop"]): r for r in doc.get("rows", [])
            if isinstance(r, dict) and "error" not in r and "cv_accuracy" in r}


def _numbered(progress: ProgressFn, k: int, n: int) -> ProgressFn:
    """``progress`` with every stage name prefixed by this probe's place: "[2/6] embed"."""
    return lambda stage, done, total: progress(f"[{k}/{n}] {stage}", done, total)


def score_probe(name: str, features: str, crop: str, files, testf, *, cv: int, seed: int, device: str,
                store, batch_size: int, workers: int | None, progress: ProgressFn) -> dict:
    """One row: CV accuracy of the frozen probe, extraction time, test accuracy when there is a test set."""
    from featx.backbones.resolve import resolve_backbone
    from featx.engines.files import FileEmbedder
    from featx.heads.fit import fit_head

    label = f"{name} {features} crop={crop}"
    progress(f"backbone {label}", 0, 0)
    bb = resolve_backbone(name, features=features, crop=crop)
    emb = FileEmbedder.open(bb, device, store)
    X, y, per_image, fresh = _embeddings(files, emb, batch_size, workers, progress)
    t = time.perf_counter()
    pipe, rep = fit_head(X, [files.classes[c] for c in y], head="logreg", C="auto", cv=cv, seed=seed)
    row = {"backbone": name, "features": features, "crop": crop, "dim": bb.dim, "fingerprint": bb.fingerprint,
           "export": str(bb.onnx_path.parent), "train_images": len(y), "C": rep["C"],
           "cv_accuracy": rep["cv_score_mean"], "cv_std": rep["cv_score_std"],
           "fit_seconds": round(time.perf_counter() - t, 3),
           "extract_ms_per_image": round(1000 * per_image, 3) if per_image else None,
           "embedded_now": fresh, "test_accuracy": None}
    if testf is not None:
        X_te, y_te, _, fresh = _embeddings(testf, emb, batch_size, workers, progress)
        row["embedded_now"] += fresh
        pred = np.asarray(rep["classes"])[pipe.predict(X_te)]
        row["test_accuracy"] = float((pred == np.asarray([testf.classes[c] for c in y_te])).mean())
    log.info("%s: CV accuracy %.4f, test %s", label, row["cv_accuracy"], row["test_accuracy"])
    return row


def _embeddings(files, emb, batch_size: int, workers: int | None, progress: ProgressFn):
    """(X, labels, seconds per image, how many were embedded now) of the readable files, via the store."""
    done = emb.files(files.paths, batch_size=batch_size, workers=workers, progress=progress)
    stats, ok = done.stats, done.ok
    if not ok:
        raise FeatXError(f"none of the {len(files)} images could be embedded: {stats.failures[:3]}")
    # seconds per image when computed; all cached: price a small batch, as an uncached run would cost
    per_image = stats.seconds_embed / stats.embedded if stats.embedded else time_embedding(files.paths[:32],
                                                                                            emb.encoder)
    return done.rows(), files.labels[ok], per_image, stats.embedded


def time_embedding(paths: list[str], enc) -> float | None:
    """Seconds per image to decode, preprocess and embed ``paths`` (one warm batch)."""
    from featx.engines.local import decode_batch

    items = [(i, p, "") for i, p in enumerate(paths)]
    enc(decode_batch(items[:2], enc.backbone.preprocess)[2])  # warm-up: opens the session
    t = time.perf_counter()
    _, _, pixels, _ = decode_batch(items, enc.backbone.preprocess)
    if not len(pixels):
        return None
    enc(pixels)
    return (time.perf_counter() - t) / len(pixels)


def recommend(rows: list[dict]) -> dict:
    """The best CV accuracy; combinations within TIE of it go to the fastest extraction."""
    top = max(r["cv_accuracy"] for r in rows)
    near = [r for r in rows if r["cv_accuracy"] >= top - TIE]
    return min(near, key=lambda r: (r["extract_ms_per_image"] or float("inf"), r["dim"]))


def command_for(row: dict, train: str | None) -> str:
    """The commands that make the recommended probe on the user's data."""
    opts = f" --backbone {row['backbone']}"
    opts += f" --features {row['features']}" if row["features"] != "last" else ""
    opts += f" --crop {row['crop']}" if row["crop"] != "center" else ""
    data = train or "TRAIN"
    return (f"featx extract {data}{opts} -o train.featx.parquet && "
            "featx fit-head -e train.featx.parquet --C auto -o head.featx")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def write_features_report(res: FeatureComparison) -> dict:
    """features.json, features.md and features.png in ``res.out``; returns their paths."""
    out, rows, best, cfg = res.out, res.rows, res.best, res.config
    cmd = command_for(best, cfg["train"])
    write_text(out / "features.json", json.dumps({"config": cfg, "rows": rows, "best": best,
                                                  "command": cmd}, indent=2))
    test = (f"test accuracy on {cfg['test_images']} given test images" if cfg["test_images"]
            else "no test set given (pass --test DIR for test accuracy)")
    lines = ["# featx compare: backbones and features", "",
             f"{cfg['train_images']} training images, {len(cfg['classes'])} classes. Each row is a frozen "
             f"probe: standardised logistic regression, C chosen by {cfg['cv_folds']}-fold stratified "
             f"cross-validation on the training images; the score is that CV accuracy (mean +- std over "
             f"folds); {test}.", "",
             "| backbone | features | crop | dim | CV accuracy | test accuracy | extraction ms/image | C |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backbone']} | {r['features']} | {r['crop']} | - | failed: "
                         f"{r['error'].replace('|', '/')} | - | - | - |")
            continue
        mark = " **<-**" if r is best else ""
        ms = "-" if r["extract_ms_per_image"] is None else f"{r['extract_ms_per_image']:.1f}"
        lines.append(f"| {r['backbone']} | {r['features']} | {r['crop']} | {r['dim']} | "
                     f"{_pct(r['cv_accuracy'])} +- {100 * r['cv_std']:.2f} | {_pct(r['test_accuracy'])} | "
                     f"{ms} | {r['C']:g} |{mark}")
    lines += ["", f"**Use {best['backbone']} with {best['features']} features and crop {best['crop']}**: the "
              f"best CV accuracy ({_pct(best['cv_accuracy'])}; within {100 * TIE:.1f} points the faster "
              "extraction wins). To make it:", "", f"    {cmd}", "",
              "Then `featx predict head.featx IMAGES` (the head records its backbone).", "",
              "![CV accuracy vs extraction time](features.png)", ""]
    write_text(out / "features.md", "\n".join(lines))
    return {"json": str(out / "features.json"), "markdown": str(out / "features.md"),
            "png": str(plot_features(out, rows, best))}


def plot_features(out: Path, rows: list[dict], best: dict) -> Path:
    p = out / "features.png"
    with figure(p, figsize=(7, 4.2), dpi=100) as (_, ax):
        for r in rows:
            if "error" in r:  # a backbone that could not be had: listed in the report, not plotted
                continue
            x = r["extract_ms_per_image"] or 0.0
            ax.errorbar(x, 100 * r["cv_accuracy"], yerr=100 * r["cv_std"], fmt="o" if r is not best else "*",
                        ms=7 if r is not best else 14, capsize=3)
            if r["test_accuracy"] is not None:
                ax.plot(x, 100 * r["test_accuracy"], "x", color="grey")
            ax.annotate(f"{r['backbone']} {r['features']} {r['crop']}", (x, 100 * r["cv_accuracy"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel("extraction time (ms per image)")
        ax.set_ylabel("accuracy (%): CV (dots), test (x)")
        ax.grid(alpha=0.3)
        ax.set_title("featx compare: frozen probes")
    return p
