"""``featx compare``: what transfer buys, measured on the user's data.

For each training-set size (images per class) three methods are trained on
the same subset and scored on the same test images:

- ``frozen``: frozen backbone + logistic regression on cached embeddings;
- ``lpft``: LP-FT fine-tuning of the top ``unfreeze`` blocks;
- ``scratch``: the same architecture from random init, all layers trained,
  with the same budget (same images, epochs, batch size and schedule).

Writes ``compare.json``, ``compare.md`` and ``learning_curve.png``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.atomic import figure, write_text
from featx.backbones.cards import DEFAULT_BACKBONE
from featx.backbones.features import DEFAULT_FEATURES
from featx.compare_features import time_embedding
from featx.errors import FeatXError
from featx.finetune.data import LabelledFiles, labelled_files
from featx.finetune.runlog import plural, write_json
from featx.progress import ProgressFn, no_progress
from featx.sampling import per_class_subset, stratified_split

log = logging.getLogger(__name__)

METHODS = ("frozen", "lpft", "scratch")
LABELS = {"frozen": "frozen + logistic regression", "lpft": "LP-FT",
          "scratch": "same architecture from scratch"}


def parse_per_class(spec: str | list) -> list[int | None]:
    """'5,20,all' -> [5, 20, None] (None: every training image)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[int | None] = []
    for it in items:
        it = str(it).strip().lower()
        if it == "all":
            out.append(None)
            continue
        try:
            n = int(it)
        except ValueError:
            raise FeatXError(f"--per-class: {it!r} is neither a number nor 'all'") from None
        if n < 1:
            raise FeatXError(f"--per-class values must be >= 1, got {n}")
        out.append(n)
    if not out:
        raise FeatXError("--per-class needs at least one value, e.g. 5,20,100,all")
    return sorted(set(out), key=lambda v: float("inf") if v is None else v)


@dataclass
class CompareResult:
    rows: list[dict]
    out: Path
    config: dict
    files: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the report must say besides the numbers


def settle_sizes(sizes: list[int | None], labels: np.ndarray, classes: list[str]) -> tuple[list[int | None], list[str]]:
    """The sizes worth a row, and notes on the ones the data cannot honour.

    A size at or above the largest class takes every training image: it is
    the 'all' row under another name, so it is measured once, as 'all' (or
    dropped when 'all' is asked for too). A size above the smallest class is
    kept, with a note naming the classes that contribute all they have.
    """
    counts = np.bincount(labels, minlength=len(classes))
    largest = int(counts.max())
    out: list[int | None] = []
    notes: list[str] = []
    for n in sizes:
        if n is not None and n >= largest:
            repeat = None in sizes or None in out
            notes.append(f"--per-class {n}: no class has more than {largest} training images, so {n} per class "
                         + ("is the 'all' row; skipped" if repeat else "means all of them; measured as 'all'"))
            if not repeat:
                out.append(None)
            continue
        if n is not None and n > counts.min():
            short = [f"{c} ({k})" for c, k in zip(classes, counts, strict=True) if k < n]
            notes.append(f"--per-class {n}: {plural(len(short), 'class', 'classes')} "
                         f"{'has' if len(short) == 1 else 'have'} fewer training images and "
                         f"{'contributes' if len(short) == 1 else 'contribute'} all of them: {', '.join(short)}")
        out.append(n)
    return sorted(set(out), key=lambda v: float("inf") if v is None else v), notes


def _test_split(train, test, seed: int, test_per_class: int | None):
    """(training files, test files, where the test files came from)."""
    files = labelled_files(train)
    if test is None:
        tr, te = stratified_split(files.labels, 0.2, seed)
        files, testf, source = files.subset(tr), files.subset(te), "20% of train, stratified"
    else:
        testf, source = labelled_files(test, classes=files.classes), "given"
    if test_per_class is not None:
        testf = testf.subset(per_class_subset(testf.labels, test_per_class, seed))
    return files, testf, source


@dataclass
class _Frozen:
    """Frozen embeddings of every image a size uses and of the test images, through the store."""

    backbone: object  # the frozen Backbone
    store: object  # EmbeddingStore
    key_of: dict[str, str | None]  # training path -> content key (None: unreadable)
    X_test: np.ndarray
    y_test: np.ndarray
    test_ok: list[int]  # indices of the readable test files
    per_image: float | None  # seconds to embed one image, when measured
    seconds: float
    failed: list[tuple[str, str]]  # (path, reason) of unreadable files


def _embed_frozen(card, files: LabelledFiles, testf: LabelledFiles, largest: int | None, seed: int,
                  device: str, store, progress: ProgressFn) -> _Frozen:
    from featx.backbones.export import make_wrapper
    from featx.backbones.zoo import build
    from featx.engines.files import FileEmbedder
    from featx.finetune import base_backbone
    from featx.finetune.loop import torch_device

    progress("backbone", 0, 0)
    module, _, wsha = build(card)
    bb = base_backbone(card, make_wrapper(module, card.preprocess), wsha, None)
    del module
    emb = FileEmbedder.open(bb, "cpu" if torch_device(device).type == "cpu" else "auto", store)
    used = files.subset(per_class_subset(files.labels, largest, seed))
    t0 = time.perf_counter()
    tr = emb.files(used.paths, progress=progress)
    if tr.failures and largest is not None:  # topping up a class needs its other files' readability
        used = files
        tr = emb.files(used.paths, progress=progress)
    te = emb.files(testf.paths, progress=progress)
    seconds = time.perf_counter() - t0
    # seconds per image when actually computed (a cached rerun would otherwise report ~0)
    per_image = (tr.stats.seconds_embed / tr.stats.embedded) if tr.stats.embedded else None
    if per_image is None:  # all cached: time a small batch to price what an uncached run costs
        per_image = time_embedding(used.paths[:32], emb.encoder)
    ok_te = te.ok
    return _Frozen(bb, emb.store, dict(zip(used.paths, tr.keys, strict=True)), te.rows(),
                   testf.labels[ok_te], ok_te, per_image, seconds, tr.failures + te.failures)


def _readable_draw(files: LabelledFiles, drawn, n: int | None, key_of: dict) -> list[int]:
    """The drawn indices whose files are readable, each class topped up (in file order) from its
    readable files not drawn when unreadable ones left it short of ``n``; the draw itself when
    every drawn file is readable."""
    ok = [int(i) for i in drawn if key_of.get(files.paths[i]) is not None]
    if n is None or len(ok) == len(drawn):
        return ok
    have = Counter(files.labels[i] for i in ok)
    taken = {int(i) for i in drawn}
    for i, (p, label) in enumerate(zip(files.paths, files.labels, strict=True)):
        if have[label] < n and i not in taken and key_of.get(p) is not None:
            ok.append(i)
            have[label] += 1
    return sorted(ok)


def _frozen_row(frozen: _Frozen, sub: LabelledFiles, seed: int) -> tuple[float, float, dict]:
    """Logistic regression on the subset's cached embeddings: (accuracy, seconds, extra fields)."""
    from featx.heads.fit import fit_head

    t = time.perf_counter()
    X = frozen.store.get([frozen.key_of[p] for p in sub.paths])
    names = [sub.classes[c] for c in sub.labels]
    counts = np.bincount(sub.labels, minlength=len(sub.classes))
    pipe, rep = fit_head(X, names, head="logreg", C="auto" if counts.min() >= 2 else 1.0, seed=seed)
    codes = np.array([sub.classes.index(c) for c in rep["classes"]])
    acc = float((codes[pipe.predict_proba(frozen.X_test).argmax(1)] == frozen.y_test).mean())
    secs = time.perf_counter() - t
    per_image = frozen.per_image
    extra = {"C": rep["C"], "fit_seconds": round(secs, 3),
             "embed_seconds": round(per_image * len(sub), 3) if per_image else None}
    if per_image:
        secs += per_image * len(sub)  # the embeddings this method needs, at measured speed
    return acc, secs, extra


def _trained_row(method: str, sub: LabelledFiles, testf: LabelledFiles, frozen: _Frozen, run_dir: Path,
                 cfg, device: str, store, keep_runs: bool, progress: ProgressFn) -> tuple[float, float, dict]:
    """LP-FT or scratch on the subset, scored on the test files: (accuracy, seconds, extra fields)."""
    from featx.finetune import finetune

    t = time.perf_counter()
    if run_dir.exists():
        shutil.rmtree(run_dir)
    opts = {"lp_init": True} if method == "lpft" else {
        "pretrained": False, "lp_init": False, "unfreeze": "all", "backbone_lr": cfg.lr, "layer_decay": 1.0}
    r = finetune(sub, out=run_dir, config=cfg, device=device, store=store, export=False,
                 progress=progress, **opts)
    secs = time.perf_counter() - t
    proba = r.predict_proba(testf.paths, device=device)[frozen.test_ok]
    acc = float((proba.argmax(1) == frozen.y_test).mean())
    extra = {"epochs": len(r.history), "train_seconds": round(secs, 3),
             "final_train_loss": r.history[-1]["train_loss"] if r.history else None}
    if not keep_runs:
        for f in run_dir.glob("*.pt"):
            f.unlink()
    return acc, secs, extra


def compare(train, test=None, *, out: str | os.PathLike = "report", per_class="5,20,100,all",
            methods: tuple[str, ...] = METHODS, backbone: str = DEFAULT_BACKBONE, epochs: int = 5,
            unfreeze: int | str = 2, lr: float = 1e-3, backbone_lr: float | None = None, layer_decay: float = 1.0,
            crop_scale: float = 0.08, erase: float = 0.0, cutmix: float = 0.0, mixup: float = 0.0,
            ema: float | None = None, batch_size: int = 32,
            input_size: int | None = None,
            test_per_class: int | None = None, seed: int = 0, device: str = "auto",
            store: str | os.PathLike | None = None, keep_runs: bool = False,
            progress: ProgressFn = no_progress, backbones=None, features=None, crops=None) -> CompareResult:
    """Accuracy and wall time vs images per class for frozen+logreg, LP-FT and scratch.

    ``test`` is a folder or (paths, labels); without it 20% of ``train`` is
    held out (stratified). ``test_per_class`` caps the test set for speed.
    Fine-tuning runs use no validation split and no early stopping, so every
    method sees exactly the same images for the same number of epochs. A
    ``per_class`` size the data cannot honour (more than a class has) is
    measured as 'all', skipped or marked, and ``CompareResult.notes`` says so.
    Unreadable files are left out of every method and listed in the notes.

    ``backbones``, ``features``, ``crops`` (lists, or comma-separated) first score
    every such frozen probe by CV on ``train`` (featx.compare_features: features.md
    says which to use); with ``methods=()`` that is all compare does.
    """
    from featx.finetune import FinetuneConfig, card_for
    from featx.finetune.loop import torch_device

    unknown = set(methods) - set(METHODS)
    probes = backbones is not None or features is not None or crops is not None
    if unknown or not (methods or probes):
        raise FeatXError(f"methods must be among {', '.join(METHODS)}, got {sorted(unknown) or methods}")
    if probes:
        from featx.compare_features import compare_features

        # the probes embed as featx extract does unless told: its default feature set
        fc = compare_features(train, test, backbones=backbones or (backbone,), features=features or (DEFAULT_FEATURES,),
                              crops=crops or ("center",), out=out, seed=seed, device=device, store=store,
                              batch_size=batch_size, test_per_class=test_per_class, progress=progress)
        if not methods:
            return CompareResult(fc.rows, fc.out, {**fc.config, "best": fc.best}, fc.files)
    files, testf, test_source = _test_split(train, test, seed, test_per_class)
    sizes, notes = settle_sizes(parse_per_class(per_class), files.labels, files.classes)
    torch_device(device)  # an impossible --device fails before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = FinetuneConfig(backbone=backbone, unfreeze=unfreeze, epochs=epochs, lr=lr, backbone_lr=backbone_lr,
                         layer_decay=layer_decay,
                         crop_scale=crop_scale, erase=erase, cutmix=cutmix, mixup=mixup, ema=ema,
                         batch_size=batch_size,
                         input_size=input_size, seed=seed,
                         val_fraction=0.0, patience=None, features="last")  # as the frozen row's probe
    card = card_for(cfg)
    cfg.validate(card)
    frozen = _embed_frozen(card, files, testf, sizes[-1], seed, device, store, progress)
    if frozen.failed:
        notes.append(f"{plural(len(frozen.failed), 'unreadable file')} left out of every method: "
                     + "; ".join(f"{p} ({why})" for p, why in frozen.failed[:5])
                     + (", ..." if len(frozen.failed) > 5 else ""))
    config = _config(cfg, card, frozen, files.classes, test_source, str(torch_device(device)))
    rows = _run_all(sizes, methods, files, testf, frozen, cfg, config, notes, out, seed, device, store,
                    keep_runs, progress)
    result = CompareResult(rows, out, config, notes=notes)
    result.files = write_report(out, rows, config, notes)
    return result


def _run_all(sizes, methods, files, testf, frozen, cfg, config: dict, notes: list[str], out: Path,
             seed: int, device: str, store, keep_runs: bool, progress: ProgressFn) -> list[dict]:
    """Every (size, method) run of ``compare``, in order; runs a previous compare with the same
    settings finished are kept, and compare.json is rewritten after each run."""
    done = finished_runs(out / "compare.json", config)
    rows: list[dict] = []
    subs = [(n, files.subset(_readable_draw(files, per_class_subset(files.labels, n, seed), n, frozen.key_of)))
            for n in sizes]
    runs = [(n, sub, method) for n, sub in subs for method in methods]
    total, t0 = len(runs), time.perf_counter()
    clock = RunClock([(m, run_work(m, len(sub), cfg.epochs)) for n, sub, m in runs
                      if (m, "all" if n is None else n) not in done])
    kept = total - len(clock.todo)
    clock.report(progress, kept, total)
    for k, (n, sub, method) in enumerate(runs, start=1):
        n_label = "all" if n is None else n
        if (method, n_label) in done:  # a rerun after Ctrl-C does not train finished runs again
            rows.append(done[(method, n_label)])
            log.info("%s @ %s/class: kept from the previous run", method, n_label)
            continue
        # every stage of this run, the trainer's epochs included, says which run of how many
        step = _numbered(progress, k, total)
        step(f"{method} @ {n_label}/class", 0, 1)
        if method == "frozen":
            acc, secs, extra = _frozen_row(frozen, sub, seed)
        else:
            acc, secs, extra = _trained_row(method, sub, testf, frozen, out / "runs" / f"{method}-{n_label}",
                                            cfg, device, store, keep_runs, step)
        row = {"per_class": n_label, "train_images": len(sub), "method": method,
               "accuracy": acc, "seconds": round(secs, 3), **extra}
        log.info("run %d/%d, %s @ %s/class: accuracy %.4f in %.1f s (%.0f s so far)", k, total, method,
                 n_label, acc, secs, time.perf_counter() - t0)
        rows.append(row)
        step(f"{method} @ {n_label}/class", 1, 1)
        write_json(out / "compare.json", _report(rows, config, notes))  # partial results survive a kill
        clock.finished(method, run_work(method, len(sub), cfg.epochs), secs)
        clock.report(progress, kept + clock.n_done, total)
    return rows


def run_work(method: str, images: int, epochs: int) -> float:
    """A run's cost in the units its method's time scales with: training images x epochs for a
    trained method, training images for the frozen probe (its embeddings are cached)."""
    return float(images * (1 if method == "frozen" else epochs))


class RunClock:
    """The ETA of a whole compare: the runs still to train, each at the seconds per unit of
    work (``run_work``) its method has taken so far in this invocation.

    A trained method not timed yet is taken at the trained methods' rate; the frozen probe
    (a logistic fit on cached embeddings) at its own, else as free. No trained run timed
    yet while one is to come: the ETA is unknown.
    """

    def __init__(self, todo: list[tuple[str, float]]) -> None:
        self.todo = todo  # (method, work) of every run this invocation trains, in order
        self.n_done = 0
        self.spent: dict[str, list[float]] = {}  # method -> [seconds, work]
        self.t0 = time.perf_counter()

    def finished(self, method: str, work: float, seconds: float) -> None:
        sw = self.spent.setdefault(method, [0.0, 0.0])
        sw[0] += seconds
        sw[1] += work
        self.n_done += 1

    def _rate(self, method: str) -> float | None:
        if method in self.spent and self.spent[method][1] > 0:
            return self.spent[method][0] / self.spent[method][1]
        if method == "frozen":
            return 0.0
        trained = [sw for m, sw in self.spent.items() if m != "frozen" and sw[1] > 0]
        return sum(s for s, _ in trained) / sum(w for _, w in trained) if trained else None

    def eta(self) -> float | None:
        """Seconds left for the runs not done; None while it cannot be estimated."""
        left = 0.0
        for method, work in self.todo[self.n_done:]:
            rate = self._rate(method)
            if rate is None:
                return None
            left += rate * work
        return left

    def report(self, progress: ProgressFn, runs_done: int, runs: int) -> None:
        """``progress("runs k/n", elapsed s, elapsed + ETA s)``: the whole compare, in seconds
        (total 0 while the ETA is unknown); k counts runs kept from a previous compare too."""
        elapsed = time.perf_counter() - self.t0
        eta = self.eta()
        progress(f"runs {runs_done}/{runs}", round(elapsed), 0 if eta is None else round(elapsed + eta))


# settings that do not change a run's result: a rerun on another device still resumes
_RESUME_IGNORES = ("device", "embed_seconds_total", "embed_seconds_per_image")


def finished_runs(path: Path, config: dict) -> dict[tuple[str, int | str], dict]:
    """Rows a previous compare with the same settings finished (its partial compare.json)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    old = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(old, dict) or not old:
        return {}
    same = {k: v for k, v in old.items() if k not in _RESUME_IGNORES} == \
        {k: v for k, v in json.loads(json.dumps(config)).items() if k not in _RESUME_IGNORES}
    if not same:
        return {}
    return {(r["method"], r["per_class"]): r for r in doc.get("rows", [])
            if isinstance(r, dict) and {"method", "per_class", "accuracy"} <= set(r)}


def _numbered(progress: ProgressFn, k: int, n: int) -> ProgressFn:
    """``progress`` with every stage name prefixed by the run's place: "[3/9] epoch"."""
    return lambda stage, done, total: progress(f"[{k}/{n}] {stage}", done, total)


def _config(cfg, card, frozen: _Frozen, classes: list[str], test_source: str, device: str) -> dict:
    """The settings and embedding costs a report states beside its rows."""
    return {"backbone": cfg.backbone, "fingerprint": frozen.backbone.fingerprint,
            "input_size": card.preprocess.input_size, "epochs": cfg.epochs, "unfreeze": cfg.unfreeze,
            "lr": cfg.lr, "backbone_lr": cfg.backbone_lr, "crop_scale": cfg.crop_scale,
            "batch_size": cfg.batch_size, "seed": cfg.seed, "device": device, "classes": classes,
            # only when set: a compare.json written before these options still matches its runs
            **{k: getattr(cfg, k) for k in ("erase", "cutmix", "mixup") if getattr(cfg, k)},
            **({"layer_decay": cfg.layer_decay} if cfg.layer_decay != 1.0 else {}),
            **({"ema": cfg.ema} if cfg.ema is not None else {}),
            "test_images": len(frozen.y_test), "test_source": test_source,
            "embed_seconds_total": round(frozen.seconds, 2),
            "embed_seconds_per_image": round(frozen.per_image, 5) if frozen.per_image else None}


def _report(rows: list[dict], config: dict, notes: list[str]) -> dict:
    return {"config": config, "rows": rows, "notes": notes}


def write_report(out: Path, rows: list[dict], config: dict, notes: list[str] | None = None) -> dict:
    """compare.json, compare.md and learning_curve.png; returns their paths."""
    notes = notes or []
    write_json(out / "compare.json", _report(rows, config, notes))
    sizes = list(dict.fromkeys(r["per_class"] for r in rows))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    cell = {(r["per_class"], r["method"]): r for r in rows}
    lines = [
        "# featx compare", "",
        f"Backbone `{config.get('backbone')}` at {config.get('input_size')} px, "
        f"{plural(config.get('epochs', 0), 'epoch')} for the trained methods, unfreeze {config.get('unfreeze')}, "
        f"device {config.get('device')}; {plural(config.get('test_images', 0), 'test image')} "
        f"({config.get('test_source')}).", "",
        "Accuracy on the test images (wall time in seconds):", "",
        "| images/class | train images | " + " | ".join(LABELS[m] for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    n_classes = len(config.get("classes", [])) or 1
    short = False
    for s in sizes:
        n_img = next(r["train_images"] for r in rows if r["per_class"] == s)
        cells = []
        for m in methods:
            r = cell.get((s, m))
            cells.append(f"{r['accuracy']:.4f} ({r['seconds']:.1f} s)" if r else "-")
        mark = s != "all" and n_img < s * n_classes  # some class has fewer images than asked
        short = short or mark
        lines.append(f"| {s}{'*' if mark else ''} | {n_img} | " + " | ".join(cells) + " |")
    if short:
        lines += ["", "\\* fewer training images than asked in some classes (see the notes)."]
    lines += ["", "Frozen wall time = fitting the head + embedding its training images at the measured "
              "speed (embeddings are cached, so a second head on the same images costs only the fit).",
              "Fine-tuning runs use no validation split and no early stopping: same images, same epochs "
              "for LP-FT and scratch."]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    lines += ["", "![learning curve](learning_curve.png)", ""]
    write_text(out / "compare.md", "\n".join(lines))
    png = plot_learning_curve(out, rows, max(1, len(config.get("classes", [])) or 1))
    return {"json": str(out / "compare.json"), "markdown": str(out / "compare.md"), "png": str(png)}


def plot_learning_curve(out: Path, rows: list[dict], n_classes: int) -> Path:
    p = out / "learning_curve.png"
    with figure(p, ncols=2, figsize=(11, 4.2), dpi=100) as (fig, (a1, a2)):
        for m, style in zip(METHODS, ("o-", "s-", "^-"), strict=True):
            rs = [r for r in rows if r["method"] == m]
            if not rs:
                continue
            x = [r["train_images"] / n_classes for r in rs]  # 'all' plots at its mean per class
            a1.plot(x, [100 * r["accuracy"] for r in rs], style, label=LABELS[m])
            a2.plot(x, [r["seconds"] for r in rs], style, label=LABELS[m])
        for a, yl in ((a1, "test accuracy (%)"), (a2, "wall time (s)")):
            a.set_xscale("log")
            a.set_xlabel("training images per class (log scale)")
            a.set_ylabel(yl)
            a.grid(alpha=0.3, which="both")
            a.legend()
        a2.set_yscale("log")
        fig.suptitle("featx compare: accuracy and cost vs training-set size")
    return p

