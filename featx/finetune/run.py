"""The training run: data and split, the epoch loop, checkpoints, resume, early stopping.

``finetune`` settles a ``TrainJob`` (config, card, checked data, run directory,
checkpoint to resume from), then ``_train`` runs it in small steps: build the
network, build the optimiser and loaders, restore a checkpoint, run the epochs,
export. Each step takes the job (and what the previous step built) instead of a
long list of positional arguments.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featx.backbones.artifact import Backbone
from featx.backbones.cards import BackboneCard, Preprocess
from featx.errors import FeatXError, require
from featx.finetune.config import FINETUNE_FORMAT, FinetuneConfig, card_for, default_run_dir
from featx.finetune.data import LabelledFiles, RunData, Skipped, check_files, labelled_files
from featx.finetune.export import export_run, predict_files
from featx.finetune.lp import init_network
from featx.finetune.resume import read_json, resume_job_parts, save_extended_config
from featx.finetune.runlog import plot_curve, write_json, write_metrics
from featx.progress import ProgressFn, no_progress
from featx.recipes import recipe_options
from featx.sampling import stratified_split

log = logging.getLogger(__name__)

#: how many skipped files status.json lists (summary.json and split.json list them all)
STATUS_SKIPPED = 20


@dataclass(frozen=True)
class RunSummary(Mapping):
    """The outcome of a run, as written to ``summary.json``.

    A typed record that also reads as a mapping (``summary["best_epoch"]``,
    ``{**summary}``), since it is the JSON file's content.
    """

    run_dir: str
    backbone: str
    unfreeze: int | str
    epochs_trained: int
    epochs: int
    best_epoch: int
    best_val_acc: float | None
    stopped_early: bool
    lp_init: bool
    lp_train_accuracy: float | None
    device: str
    train_images: int
    val_images: int
    val_source: str
    classes: list[str]
    trainable_parameters: int
    seconds: float
    fingerprint: str | None
    head: str | None
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} of files left out
    probe_val_acc: float | None = None  # the LP probe (the network before any step) on the validation split
    kept_probe: bool = False  # no epoch beat the probe on validation: the export is the probe
    plan: dict | None = None  # how a time budget chose the epochs (``time_budget``)
    # the last epoch was kept over a higher-scoring one within the validation noise:
    # {"top_epoch", "top_val_acc", "standard_error", "threshold"} (featx.finetune.run.keeps_last_epoch)
    kept_last: dict | None = None
    # ``seconds`` is the whole run's wall time, summed over its invocations (--resume);
    # this is the last invocation's alone
    seconds_this_invocation: float | None = None

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._names()}


@dataclass
class FinetuneResult:
    """What a run produced. ``net`` is the best network, on CPU, in eval mode.

    ``skipped`` lists ``(path, reason)`` for every file the run left out
    because it could not be read or decoded.
    """

    run_dir: Path
    classes: list[str]
    history: list[dict]
    best_epoch: int
    net: object
    preprocess: Preprocess
    backbone: Backbone | None = None  # the exported run_dir/backbone
    head_path: Path | None = None
    lp_report: dict | None = None
    seconds: float = 0.0
    stopped_early: bool = False
    summary: RunSummary | None = None
    skipped: list[Skipped] = field(default_factory=list)

    def predict_proba(self, paths: list[str], batch_size: int = 64, device: str = "cpu") -> np.ndarray:
        """Class probabilities of image files with the in-memory network (centre crop)."""
        return predict_files(self.net, paths, self.preprocess, len(self.classes), batch_size, device)


class FinetuneInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the run directory holds the last completed epoch."""

    def __init__(self, run_dir: Path, epoch: int) -> None:
        super().__init__(f"interrupted after epoch {epoch}")
        self.run_dir = run_dir
        self.epoch = epoch


def arrays_as_files(data, root: Path):
    """``(images, labels)`` with uint8 image arrays -> PNG files under ``root`` (paths pass through).

    Runs are resumable and LP init goes through the content-keyed store, both of
    which need files; lossless PNG keeps the pixels exact.
    """
    if data is None or isinstance(data, (str, os.PathLike, LabelledFiles)):
        return data
    try:
        images, labels = data
    except (TypeError, ValueError):
        return data
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim in (3, 4):
        images = list(images)
    if not len(images) or not all(isinstance(a, np.ndarray) for a in images):
        return data
    from featx.embed.images import array_to_pil

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(images):
        p = root / f"{i:07d}.png"
        array_to_pil(a, f"image {i}").save(p)
        paths.append(str(p))
    return paths, [str(v) for v in labels]


# ---- settling what to train ----------------------------------------------------------------

@dataclass
class TrainJob:
    """A run ready to train: settled config, checked data, run directory, and how to run it."""

    cfg: FinetuneConfig
    card: BackboneCard
    unfreeze: int | None  # card blocks to train; None: everything
    data: RunData
    run_dir: Path
    dev: Any  # torch.device
    device: str  # as asked: auto | cpu | cuda
    loader_workers: int | None
    store: str | os.PathLike | None
    export: bool
    progress: ProgressFn
    on_epoch: Callable[[dict], None] | None
    t_start: float
    checkpoint: dict | None = None  # last.pt of a resumed run
    resumed: bool = False
    extended: bool = False  # a resumed run given more epochs
    command: str | None = None  # the command line, for the run's model card
    plan: dict | None = None  # what a time budget chose, once the first steps are timed
    on_plan: Callable[[dict], None] | None = None
    seconds_before: float = 0.0  # wall time of the run's earlier invocations (a resumed run)
    val_seconds: float | None = None  # the first epoch's validation, measured (a time budget re-plans with it)
    epoch_walls: list[float] = field(default_factory=list)  # wall time of each epoch of this invocation

    def seconds(self) -> float:
        """The run's wall time so far: earlier invocations plus this one."""
        return self.seconds_before + time.perf_counter() - self.t_start


def _skip_summary(skipped: list[Skipped], what: str) -> str:
    shown = "; ".join(f"{p} ({why})" for p, why in skipped[:3])
    return f"{len(skipped)} {what} file{'s' if len(skipped) != 1 else ''} cannot be used: {shown}" + (
        ", ..." if len(skipped) > 3 else "")


def _check(files: LabelledFiles, card: BackboneCard, what: str,
           progress: ProgressFn) -> tuple[LabelledFiles, list[Skipped]]:
    """The readable files of ``files``; a FeatXError when none (or no image of some class) is left."""
    usable, bad = check_files(files, card.preprocess, progress=progress)
    skipped = list(files.skipped) + bad
    if not len(usable):
        raise FeatXError(f"no usable {what} image: {_skip_summary(bad, what)}; fix or remove them "
                         "before fine-tuning")
    present, readable = set(files.labels.tolist()), set(usable.labels.tolist())
    empty = [c for i, c in enumerate(files.classes) if i in present and i not in readable]
    if empty and what == "training":  # every class must train; a validation set may lack one
        raise FeatXError(f"no readable {what} image of class{'es' if len(empty) > 1 else ''} "
                         f"{', '.join(empty)}: {_skip_summary(bad, what)}")
    for p, why in bad:
        log.warning("skipped %s: %s", p, why)
    return usable, skipped


def prepare_data(data, val, cfg: FinetuneConfig, card: BackboneCard,
                 progress: ProgressFn = no_progress) -> RunData:
    """Labelled files, unreadable ones left out and reported, then the validation split.

    Raises a FeatXError before any training when no training image (or no
    image of a class, or no given validation image) can be read.
    """
    files, skipped = _check(labelled_files(data), card, "training", progress)
    if val is not None:
        valf, val_skipped = _check(labelled_files(val, classes=files.classes), card, "validation", progress)
        return RunData(files, valf, "given", skipped + val_skipped)
    if cfg.val_fraction <= 0:
        return RunData(files, None, "none", skipped)
    tr, va = stratified_split(files.labels, cfg.val_fraction, cfg.seed)
    if len(va) == 0:
        log.warning("too few images to carve a %.0f%% validation split; training without validation",
                    100 * cfg.val_fraction)
        return RunData(files, None, "none (too few images to carve a validation split)", skipped)
    return RunData(files.subset(tr), files.subset(va), f"{cfg.val_fraction:.0%} of train, stratified", skipped)


def _new_job(data, val, out, config: FinetuneConfig | None, options: dict,
             progress: ProgressFn) -> tuple[FinetuneConfig, BackboneCard, RunData, Path]:
    if data is None:
        raise FeatXError("no training data given (a folder or a (paths, labels) pair)")
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    if set(options) - known:
        raise FeatXError(f"unknown fine-tuning options {sorted(set(options) - known)}; "
                         f"expected FinetuneConfig fields: {', '.join(sorted(known))}")
    # a recipe fills what the options do not say; an option given explicitly wins
    recipe = recipe_options(options.get("recipe"))
    cfg = dataclasses.replace(config or FinetuneConfig(), **{**recipe, **options})
    cfg.validate_types()
    card = card_for(cfg)
    cfg.validate(card)
    run_dir = Path(out) if out is not None else default_run_dir()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FeatXError(f"{run_dir} already exists and is not empty; pass another --out, or "
                         f"--resume {run_dir} to continue that run")
    data = arrays_as_files(data, run_dir / "images" / "train")
    val = arrays_as_files(val, run_dir / "images" / "val")
    return cfg, card, prepare_data(data, val, cfg, card, progress), run_dir


def finetune(data=None, *, val=None, out: str | os.PathLike | None = None,
             config: FinetuneConfig | None = None, resume: str | os.PathLike | None = None,
             root: str | os.PathLike | None = None, device: str = "auto", loader_workers: int | None = None,
             workers: int | None = None, store: str | os.PathLike | None = None, export: bool = True,
             progress: ProgressFn = no_progress, on_epoch: Callable[[dict], None] | None = None,
             on_plan: Callable[[dict], None] | None = None, command: str | None = None,
             **options) -> FinetuneResult:
    """Fine-tune a backbone card on labelled images; returns the run (and writes its directory).

    Parameters
    ----------
    data, val
        A folder in ImageFolder layout or a ``(paths, labels)`` pair (``val``
        default: a stratified ``val_fraction`` of ``data``). Every file is read
        and decoded once before training: unreadable ones are left out and
        listed in ``FinetuneResult.skipped`` and ``summary.json``; no usable
        training image, no usable image of some class, or a given ``val`` with
        no usable image is a FeatXError before any training.
    resume, root
        ``resume=RUN_DIR`` continues an interrupted run from its last completed
        epoch with its saved config and split (``data`` is then ignored, and the
        only option allowed is ``epochs``: more epochs extend a run, even a
        finished one, stretching the cosine schedule from the current step).
        The data must be where the run found it, byte for byte; data that moved
        is found with ``root=NEW_DIR`` (its files must still match).
    loader_workers
        DataLoader processes (default: 0 on CPU, up to 8 on CUDA). ``workers``
        is its deprecated old name (elsewhere in featx, ``workers`` means
        decoding threads).
    options
        ``FinetuneConfig`` fields (``unfreeze=2, epochs=10, lr=1e-3, ...``). ``recipe=NAME``
        (``featx.recipes.RECIPES``) sets the fields it names first (over ``config``'s
        too); the other keyword options override it.
    progress, on_epoch
        ``progress(stage, done, total)`` reports stages ``check`` (decoding the
        images once), ``verify`` (hashing them again on resume), ``embed``, ``lp-init``, ``epoch`` (batches), ``validate`` and
        ``export``; ``on_epoch(row)`` gets each epoch's metrics; with ``time_budget``
        (seconds), ``on_plan(plan)`` gets the epochs chosen from the speed of the
        first steps, then again from epoch 2's (``plan["first_plan"]`` holds the
        first; the last is ``summary.plan``).
    command
        The command line, recorded in the run's model card (``RUN_DIR/README.md``,
        written when training starts and again with the final metrics at the end).

    Ctrl-C raises ``FinetuneInterrupted`` (a KeyboardInterrupt) after the run
    directory is left consistent.
    """
    require("torch", "torch")
    from featx.finetune import loop as tl

    if workers is not None:
        warnings.warn("finetune(workers=) is deprecated: it sets DataLoader processes, which "
                      "loader_workers= now names (workers means decoding threads elsewhere in featx)",
                      DeprecationWarning, stacklevel=2)
        loader_workers = workers if loader_workers is None else loader_workers
    t_start = time.perf_counter()
    dev = tl.torch_device(device)
    if resume is not None:
        cfg, card, run_data, run_dir, ckpt, extended = resume_job_parts(Path(resume), options, root, progress)
    else:
        if root is not None:
            raise FeatXError("root= (--root) only applies with --resume, to find data that moved")
        cfg, card, run_data, run_dir = _new_job(data, val, out, config, options, progress)
        ckpt, extended = None, False
    job = TrainJob(cfg, card, tl.resolve_unfreeze(card, cfg.unfreeze), run_data, run_dir, dev, device,
                   loader_workers, store, export, progress, on_epoch, t_start, ckpt, resume is not None, extended,
                   command, on_plan=on_plan, seconds_before=_seconds_before(run_dir) if resume is not None else 0.0)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_run(run_dir)
    try:
        return _train(job)
    finally:
        lock.release()


def _seconds_before(run_dir: Path) -> float:
    """The wall time the run's earlier invocations recorded in status.json (0 when none did:
    a run from an older featx, or one stopped before its first status)."""
    try:
        seconds = json.loads((run_dir / "status.json").read_text()).get("seconds")
    except (OSError, ValueError, AttributeError):
        return 0.0
    ok = isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 <= seconds < float("inf")
    return float(seconds) if ok else 0.0


def _lock_run(run_dir: Path):
    """One process per run directory: a second trainer (or a --resume racing it) is refused."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(run_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FeatXError(f"{run_dir} is being trained by another featx process; wait for it, "
                         "or stop it (Ctrl-C) and then --resume") from None
    return lock


# ---- training ------------------------------------------------------------------------------

@dataclass
class _Model:
    """The network to train, and what building it found out."""

    net: Any  # loop.FineTuneNet
    weights_sha: str
    lp_report: dict | None
    n_trainable: int
    bn_stats: bool
    average: Any | None = None  # loop.WeightAverage with --ema

    @property
    def kept(self) -> Any:
        """The weights validated, kept as best.pt and exported: the average with --ema."""
        return self.average.net if self.average is not None else self.net


@dataclass
class _Trainer:
    """Optimiser, schedule, losses and data for the epochs."""

    optimizer: Any
    scheduler: Any
    loss_fn: Any
    val_loss_fn: Any
    train_ds: Any  # data.ImageDataset
    val_loader: Any | None
    workers: int
    pin: bool
    drop_last: bool
    steps: int  # optimiser steps per epoch
    mix: Any | None = None  # loop.BatchMix (--cutmix, --mixup)


@dataclass
class _State:
    """Where training stands: what a checkpoint saves besides the weights."""

    start: int = 0
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_key: list | None = None
    bad: int = 0  # epochs since the best one
    stopped_early: bool = False
    probe: dict | None = None  # {"val_acc", "val_loss"} of the LP probe, the "epoch 0" every epoch must beat


def _status(job: TrainJob, state: str, epoch: int, **extra) -> None:
    """status.json: the run's state, and its wall time so far (every invocation), which a
    --resume reads back so the summary's ``seconds`` covers the whole run."""
    skipped = job.data.skipped
    write_json(job.run_dir / "status.json", {
        "state": state, "epoch": epoch, "epochs": job.cfg.epochs, "seconds": round(job.seconds(), 2), **extra,
        **({"skipped": len(skipped), "skipped_files": [{"path": p, "reason": r} for p, r in
                                                        skipped[:STATUS_SKIPPED]]} if skipped else {})})


def _write_manifest(job: TrainJob) -> None:
    """split.json (the exact files, with content keys) and config.json, before any training."""
    d = job.data
    write_json(job.run_dir / "split.json", {
        "train": d.train.to_dict(), "val": d.val.to_dict() if d.val else None, "val_source": d.val_source,
        "skipped": [{"path": p, "reason": r} for p, r in d.skipped]})
    write_json(job.run_dir / "config.json", {"featx_finetune": FINETUNE_FORMAT,
                                             "config": dataclasses.asdict(job.cfg),
                                             "classes": d.train.classes, "card": job.card.to_dict(),
                                             "command": job.command})
    _write_card(job)


def _counts(files: LabelledFiles | None) -> dict[str, int] | None:
    if files is None:
        return None
    n = np.bincount(np.asarray(files.labels, dtype=np.int64), minlength=len(files.classes))
    return {c: int(k) for c, k in zip(files.classes, n, strict=True)}


def _write_card(job: TrainJob, result: FinetuneResult | None = None) -> None:
    """RUN_DIR/README.md: the run's model card (featx.modelcard), final once ``result`` is given.

    A card that cannot be written is a warning: the run's own files are what matter.
    """
    from featx.modelcard import write_run_card

    d = job.data
    command, resumed_with = job.command, []
    if job.resumed:  # the card keeps the command that started the run, then this one
        saved = read_json(job.run_dir / "config.json", "the run's config")
        command, resumed_with = saved.get("command"), [job.command] if job.command else []
    try:
        write_run_card(job.run_dir, job.card, dataclasses.asdict(job.cfg), train_counts=_counts(d.train),
                       val_counts=_counts(d.val), data={"train_root": d.train.root, "val_source": d.val_source,
                                                        "skipped": len(d.skipped)},
                       summary=result.summary.to_dict() if result and result.summary else None,
                       history=result.history if result else (), backbone=result.backbone if result else None,
                       command=command, resumed_with=resumed_with)
    except OSError as e:
        log.warning("%s: the run's model card could not be written (%s)", job.run_dir, e.strerror or e)


def _build_model(job: TrainJob) -> _Model:
    """The network (LP head fitted on a new run), its trainable blocks set, on the device."""
    from featx.finetune import loop as tl

    cfg, run_dir = job.cfg, job.run_dir
    tl.seed_everything(cfg.seed)
    init = init_network(cfg, job.data.train, store=job.store, device=job.device,
                        lp=job.checkpoint is None and cfg.lp_init, progress=job.progress)
    lp_report = init.lp_report
    if lp_report is not None:
        write_json(run_dir / "lp_head.json", lp_report)
    elif (run_dir / "lp_head.json").is_file():
        lp_report = read_json(run_dir / "lp_head.json", "the LP probe's report")
    n_trainable = tl.set_trainable(init.net, job.card, job.unfreeze)
    bn_stats = (not cfg.pretrained) if cfg.bn_stats is None else bool(cfg.bn_stats)
    net = tl.to_device(init.net, job.dev)
    average = tl.WeightAverage(net, cfg.ema) if cfg.ema is not None else None
    return _Model(net, init.weights_sha, lp_report, n_trainable, bn_stats, average)


def _make_trainer(job: TrainJob, net) -> _Trainer:
    import torch

    from featx.finetune import loop as tl
    from featx.finetune.data import DECODED_CACHE_BYTES, ImageDataset, class_weights, make_loader

    cfg, card, train, dev = job.cfg, job.card, job.data.train, job.dev
    pin = dev.type == "cuda"
    workers = job.loader_workers
    if workers is None:
        workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if dev.type == "cuda" else 0
    # decoded once per run, not once per epoch, where the dataset lives in this process
    cache = DECODED_CACHE_BYTES if workers == 0 else 0
    train_ds = ImageDataset(train, card.preprocess, train=True, seed=cfg.seed, crop_scale=cfg.crop_scale,
                            erase=cfg.erase, cache_bytes=cache)
    # drop a last batch of one: BatchNorm in training mode cannot normalise a single image
    drop_last = len(train) % cfg.batch_size == 1 and len(train) > 1
    steps = max(1, len(train) // cfg.batch_size if drop_last else -(-len(train) // cfg.batch_size))
    val_loader = None
    if job.data.val is not None:
        val_ds = ImageDataset(job.data.val, card.preprocess, train=False, cache_bytes=cache)
        val_loader = make_loader(val_ds, cfg.batch_size * 2, False, cfg.seed, 0, workers, pin)
    backbone_lr = cfg.backbone_lr if cfg.backbone_lr is not None else cfg.lr / 10
    depths = tl.unit_depths(net, card, job.unfreeze) if cfg.layer_decay != 1.0 else None
    optimizer = torch.optim.AdamW(tl.param_groups(net, cfg.lr, backbone_lr, cfg.weight_decay, depths,
                                                  cfg.layer_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, tl.warmup_cosine(cfg.epochs * steps, round(cfg.warmup_epochs * steps)))
    weight = None
    if cfg.class_weight == "balanced":
        weight = torch.from_numpy(class_weights(train.labels, len(train.classes))).to(dev)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    mix = tl.BatchMix(cfg.cutmix, cfg.mixup, cfg.seed) if cfg.cutmix or cfg.mixup else None
    return _Trainer(optimizer, scheduler, loss_fn, torch.nn.CrossEntropyLoss(), train_ds, val_loader,
                    workers, pin, drop_last, steps, mix)


def _restore(job: TrainJob, model: _Model, trainer: _Trainer) -> _State:
    """The training state of a resumed run's checkpoint (a fresh one for a new run)."""
    from featx.finetune import loop as tl

    ckpt = job.checkpoint
    if ckpt is None:
        return _State()
    path = job.run_dir / "last.pt"
    tl.restore_checkpoint(ckpt, path, model.net, trainer.optimizer, trainer.scheduler, model.average)
    state = _State(ckpt["epoch"], ckpt["history"], ckpt["best_epoch"], ckpt["best_key"], ckpt["bad_epochs"])
    probe = ckpt.get("probe")
    if isinstance(probe, dict) and all(isinstance(probe.get(k), float) for k in ("val_acc", "val_loss")):
        state.probe = {"val_acc": probe["val_acc"], "val_loss": probe["val_loss"]}
    sched = trainer.scheduler
    for g, base, lam in zip(trainer.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
        g["lr"] = base * lam(sched.last_epoch)  # the (possibly stretched) schedule at this step
    if job.extended:
        state.bad = 0  # an extended run gets its full patience again
    log.info("resuming %s after epoch %d", job.run_dir, state.start)
    return state


def _epoch(job: TrainJob, model: _Model, trainer: _Trainer, epoch: int) -> dict:
    """Train one epoch and validate; the epoch's metrics row."""
    from featx.finetune import loop as tl
    from featx.finetune.data import make_loader

    cfg, t = job.cfg, trainer
    loader = make_loader(t.train_ds, cfg.batch_size, True, cfg.seed, epoch, t.workers, t.pin, t.drop_last)
    on_steps = None
    if cfg.time_budget is not None and not job.resumed and epoch == (1 if job.plan is None else 2):
        # planned from epoch 1's first 10 steps, then again from a tenth of epoch 2, with epoch 1
        # and its validation measured: 10 steps misjudge the speed (60k Fashion-MNIST, one command
        # twice: 155 and 249 img/s, 220 over the epochs; a 60-minute budget ended at 42)
        steps = PLAN_STEPS if epoch == 1 else max(PLAN_STEPS, t.steps // 10)
        on_steps = (steps, _planner(job, trainer, time.perf_counter() - job.t_start, epochs_done=epoch - 1))
    row = {"epoch": epoch, **tl.run_epoch(model.net, loader, job.dev, t.loss_fn, t.optimizer, t.scheduler,
                                          job.progress, model.bn_stats, on_steps,
                                          stage=f"epoch {epoch}/{cfg.epochs}", average=model.average,
                                          mix=t.mix, epoch=epoch)}
    if row["images"] == 0:
        raise FeatXError(f"epoch {epoch}: none of the {len(job.data.train)} training images could be read "
                         f"(under {job.data.train.root}); did the data change during the run?")
    row.update({"val_loss": float("nan"), "val_acc": float("nan")})
    if t.val_loader is not None:
        t_val = time.perf_counter()
        row.update(tl.evaluate(model.kept, t.val_loader, job.dev, t.val_loss_fn, job.progress))
        job.val_seconds = time.perf_counter() - t_val
    lrs = {g["name"]: g["lr"] for g in t.optimizer.param_groups}
    row["lr_head"] = lrs.get("head", lrs.get("head-nodecay"))
    row["lr_backbone"] = lrs.get("backbone", lrs.get("backbone-nodecay", 0.0))
    return row


#: training steps timed (after the first) before a time budget chooses the number of epochs
PLAN_STEPS = 10
#: share of a time budget kept for the export at the end (ONNX export and parity checks)
EXPORT_RESERVE = 0.05


def _planner(job: TrainJob, trainer: _Trainer, spent: float,
             epochs_done: int = 0) -> Callable[[int, int, float], None]:
    """The ``on_steps`` callback that turns the speed of the first steps into a number of epochs.

    ``spent`` is what the run used before this epoch (image check, LP init; in
    the re-plan of epoch 2, epoch 1 too). An epoch costs its training images at
    the measured rate plus its validation: measured in epoch 1 once there was
    one, else the validation images at a third of the rate (a forward pass, no
    backward). The epochs that fit what is left, less a reserve for the export,
    are at least ``epochs_done + 1`` and at most the cap (``cfg.epochs`` as
    given); the cosine schedule is rebuilt for them (inside or just after the
    first epoch's warmup, so nothing jumps).
    """
    cfg = job.cfg
    first = job.plan

    def plan(steps: int, images: int, seconds: float) -> None:
        per_image = seconds / max(images, 1)
        n_val = len(job.data.val) if job.data.val is not None else 0
        val_s = job.val_seconds if first is not None and job.val_seconds is not None else per_image * n_val / 3
        epoch_s = per_image * len(job.data.train) + val_s
        left = cfg.time_budget * (1 - EXPORT_RESERVE) - spent
        cap = first["epochs_cap"] if first is not None else cfg.epochs
        fits = epochs_done + int(left // epoch_s) if epoch_s > 0 else cap
        epochs = max(epochs_done + 1, min(cap, fits))
        chosen = {"time_budget_s": cfg.time_budget, "timed_steps": steps, "images_per_second": 1 / per_image,
                  "seconds_per_epoch": round(epoch_s, 1), "seconds_before_training": round(spent, 1),
                  "epochs_that_fit": fits, "epochs": epochs, "epochs_cap": cap}
        if first is not None:
            chosen.update(replanned_in_epoch=epochs_done + 1, first_plan=first)
        log.info("time budget %.0f s%s: %.1f training images/s over %d steps, %.0f s an epoch, %.0f s "
                 "spent before: %d epoch%s", cfg.time_budget, "" if first is None else " (re-planned)",
                 1 / per_image, steps, epoch_s, spent, epochs, "" if epochs == 1 else "s")
        _adopt_plan(job, trainer, chosen)

    return plan


def _adopt_plan(job: TrainJob, trainer: _Trainer, plan: dict) -> None:
    """Train ``plan["epochs"]``: the cosine schedule rebuilt for them, config.json saved, the caller told."""
    from featx.finetune import loop as tl

    cfg = job.cfg
    job.plan, cfg.epochs = plan, plan["epochs"]
    f = tl.warmup_cosine(cfg.epochs * trainer.steps, round(cfg.warmup_epochs * trainer.steps))
    trainer.scheduler.lr_lambdas = [f] * len(trainer.optimizer.param_groups)
    save_extended_config(job.run_dir, cfg)  # a --resume continues with the chosen epochs
    if job.on_plan is not None:
        job.on_plan(dict(plan))


def epochs_to_replan(done: int, fits: int, cap: int, planned: int) -> int | None:
    """The epochs a budgeted run switches to after ``done`` of ``planned`` (None: it keeps its plan).

    At least one more epoch and at most ``cap``; a change under 5% of the plan (and
    at least one epoch) is noise: 10 s epochs that measured 9 or 10 s by turns
    flipped 56 -> 57 -> 56 -> 57, which only printed lines.
    """
    epochs = max(done + 1, min(cap, fits))
    return epochs if abs(epochs - planned) >= max(1, round(0.05 * planned)) else None


def _replan_after_epoch(job: TrainJob, trainer: _Trainer, state: _State) -> None:
    """Choose a budgeted run's epochs again from the wall time of whole epochs.

    The plans made inside epochs 1 and 2 time a few steps, and a slow or fast stretch
    there decides the whole run (h60's epoch-2 plan priced an epoch at 281 s where
    they took 225-270 s, so a 60-minute run ended after 50). From epoch 2 on, each
    whole epoch (training, validation, checkpoints) is measured; the mean over those
    after epoch 1 (which also fills the decoded-image cache) sets the epochs that fit
    what is left, when they differ from the plan by at least 5% (or one epoch). Only in
    the first half of the run: later, a longer or shorter cosine would jolt the
    learning rate.
    """
    cfg, plan, done = job.cfg, job.plan, len(state.history)
    if cfg.time_budget is None or plan is None or job.resumed or done < 2 or 2 * done > cfg.epochs:
        return
    whole = job.epoch_walls[1:]
    epoch_s = sum(whole) / len(whole)
    spent = time.perf_counter() - job.t_start
    left = cfg.time_budget * (1 - EXPORT_RESERVE) - spent
    fits = done + int(left // epoch_s)
    epochs = epochs_to_replan(done, fits, plan["epochs_cap"], cfg.epochs)
    if epochs is None:
        return
    rows = state.history[1:]
    images_per_second = sum(r["images"] for r in rows) / max(sum(r["seconds"] for r in rows), 1e-9)
    log.info("time budget %.0f s (re-planned after epoch %d): %.0f s an epoch over %d whole epochs, %.0f s "
             "spent: %d epochs instead of %d", cfg.time_budget, done, epoch_s, len(whole), spent, epochs,
             cfg.epochs)
    _adopt_plan(job, trainer, {
        "time_budget_s": cfg.time_budget, "timed_epochs": len(whole), "images_per_second": images_per_second,
        "seconds_per_epoch": round(epoch_s, 1), "seconds_spent": round(spent, 1), "epochs_that_fit": fits,
        "epochs": epochs, "epochs_before": cfg.epochs, "epochs_cap": plan["epochs_cap"],
        "replanned_after_epoch": done, "first_plan": plan.get("first_plan", plan)})


def _record(job: TrainJob, model: _Model, trainer: _Trainer, state: _State, row: dict) -> None:
    """Keep the best weights, checkpoint the epoch, log its metrics."""
    from featx.finetune import loop as tl

    epoch = row["epoch"]
    state.history.append(row)
    # best = highest val accuracy, ties to lower val loss; without val, the last epoch
    key = (row["val_acc"], -row["val_loss"]) if trainer.val_loader is not None else (epoch, 0.0)
    if state.best_key is None or tuple(key) > tuple(state.best_key):
        state.best_key, state.best_epoch, state.bad = list(key), epoch, 0
        tl.atomic_save(model.kept.state_dict(), job.run_dir / "best.pt")
    else:
        state.bad += 1
    ckpt = {"model": model.net.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "rng": tl.rng_state(), "epoch": epoch,
            "history": state.history, "best_epoch": state.best_epoch, "best_key": state.best_key,
            "bad_epochs": state.bad, "probe": state.probe}
    if model.average is not None:
        ckpt["ema"] = model.average.state_dict()
    tl.atomic_save(ckpt, job.run_dir / "last.pt")
    write_metrics(job.run_dir, state.history)
    _status(job, "training", epoch)
    if job.on_epoch is not None:
        job.on_epoch(dict(row, best_epoch=state.best_epoch))


def _score_probe(job: TrainJob, model: _Model, trainer: _Trainer, state: _State) -> None:
    """Validate the LP-initialised network (it is the probe, exactly) and make it the epoch to beat.

    Fine-tuning that never beats the frozen probe on the validation split then
    exports the probe (``best_epoch`` 0, ``kept_probe``) instead of a worse model.
    """
    from featx.finetune import loop as tl

    if job.resumed or model.lp_report is None or trainer.val_loader is None:
        return
    row = tl.evaluate(model.net, trainer.val_loader, job.dev, trainer.val_loss_fn, job.progress)
    state.probe = {"val_acc": float(row["val_acc"]), "val_loss": float(row["val_loss"])}
    state.best_key, state.best_epoch = [row["val_acc"], -row["val_loss"]], 0
    tl.atomic_save(model.net.state_dict(), job.run_dir / "best.pt")
    model.lp_report["val_accuracy"] = state.probe["val_acc"]
    write_json(job.run_dir / "lp_head.json", model.lp_report)
    log.info("the LP probe scores %.4f on the validation split; fine-tuning must beat it",
             state.probe["val_acc"])


def _run_epochs(job: TrainJob, model: _Model, trainer: _Trainer, state: _State) -> None:
    """Epochs ``start+1 .. epochs``, stopping after ``patience`` epochs without improvement (0: never)."""
    patience = job.cfg.patience
    try:
        epoch = state.start + 1
        while epoch <= job.cfg.epochs:  # not a range: a time budget sets the epochs during the first
            if patience and state.bad >= patience:
                state.stopped_early = True
                break
            t_epoch = time.perf_counter()
            _record(job, model, trainer, state, _epoch(job, model, trainer, epoch))
            job.epoch_walls.append(time.perf_counter() - t_epoch)
            _replan_after_epoch(job, trainer, state)
            epoch += 1
    except KeyboardInterrupt:
        done = state.history[-1]["epoch"] if state.history else state.start
        _status(job, "interrupted", done)
        raise FinetuneInterrupted(job.run_dir, done) from None
    except FeatXError as e:
        _status(job, "failed", state.history[-1]["epoch"] if state.history else state.start, error=str(e))
        raise


def _finish(job: TrainJob, model: _Model, state: _State) -> FinetuneResult:
    """The best weights back on CPU, the curve, the export, summary.json."""
    import torch

    from featx.finetune import loop as tl

    run_dir, cfg, card = job.run_dir, job.cfg, job.card
    net = model.net
    kept_last = keeps_last_epoch(state.history, state.best_epoch, state.probe,
                                 len(job.data.val) if job.data.val is not None else 0, state.stopped_early)
    if kept_last is not None:  # the weights in memory are the last epoch's
        tl.atomic_save(model.kept.state_dict(), run_dir / "best.pt")
        state.best_epoch = state.history[-1]["epoch"]
        log.info("keeping the last epoch %d: the top epoch %d is within the validation noise (%.4f) of it",
                 state.best_epoch, kept_last["top_epoch"], kept_last["threshold"])
    if (run_dir / "best.pt").is_file():
        tl.load_weights(net, run_dir / "best.pt", job.dev)
    net = net.to("cpu", memory_format=torch.contiguous_format).float().eval()
    plot_curve(run_dir, state.history, state.best_epoch)
    result = FinetuneResult(run_dir=run_dir, classes=job.data.train.classes, history=state.history,
                            best_epoch=state.best_epoch, net=net, preprocess=card.preprocess,
                            lp_report=model.lp_report, stopped_early=state.stopped_early,
                            skipped=list(job.data.skipped))
    if job.export:
        job.progress("export", 0, 1)
        result.backbone, result.head_path = export_run(result.net, run_dir, result.classes, state.history,
                                                       state.best_epoch, card, cfg, model.weights_sha,
                                                       train_keys=job.data.train.keys)
        job.progress("export", 1, 1)
    result.seconds = job.seconds()  # every invocation of the run, a --resume's included
    result.summary = _summary(job, model, result, state.probe, kept_last)
    if result.summary.kept_probe:
        log.warning("fine-tuning did not beat the linear probe on the validation split (probe %.4f, best "
                    "epoch %.4f): the run exports the probe", state.probe["val_acc"],
                    max(h["val_acc"] for h in state.history) if state.history else float("nan"))
    write_json(run_dir / "summary.json", result.summary.to_dict())
    _write_card(job, result)
    _status(job, "done", len(state.history))
    return result


def keeps_last_epoch(history: list[dict], top_epoch: int, probe: dict | None, n_val: int,
                     stopped_early: bool = False) -> dict | None:
    """Whether a run keeps its last epoch over ``top_epoch``, the one that scored highest.

    The top score on a validation split is partly its noise: on 200 validation
    images (one image is half a point) the top epoch of s200 was epoch 26, which
    scored 87.48% on the 10k test, where its last epoch (the end of the cosine
    schedule) scored 89.04%; on 6,000 images f60's top epoch 12 scored 94.61%
    and its last 94.73%. And the top of E epochs is the largest of E noisy draws,
    which sits about sqrt(2 ln E) standard errors above their mean (r200s2: the
    top of 86 epochs was 0.94 where its last 20 ran at 0.89-0.92). So the last
    epoch is kept unless the top one beats it by more than that: the standard
    error of the top accuracy, sqrt(p (1 - p) / n), times sqrt(2 ln E) (at least
    one standard error); and as long as the last epoch still beats the probe. A run that ``stopped_early`` (--patience)
    keeps its top epoch: its last one is not the end of the schedule, only the epochs
    that failed to improve. None keeps ``top_epoch``; else
    {"top_epoch", "top_val_acc", "standard_error", "threshold"}.
    """
    if stopped_early or not history or n_val == 0 or top_epoch in (0, history[-1]["epoch"]):
        return None
    top = next((h for h in history if h["epoch"] == top_epoch), None)
    last = history[-1]
    if top is None or math.isnan(last["val_acc"]):
        return None
    se = math.sqrt(top["val_acc"] * (1 - top["val_acc"]) / n_val)
    threshold = se * max(1.0, math.sqrt(2 * math.log(len(history))))
    if last["val_acc"] < top["val_acc"] - threshold or (probe is not None and last["val_acc"] <= probe["val_acc"]):
        return None
    return {"top_epoch": top_epoch, "top_val_acc": top["val_acc"], "standard_error": round(se, 5),
            "threshold": round(threshold, 5)}


def _summary(job: TrainJob, model: _Model, result: FinetuneResult, probe: dict | None,
             kept_last: dict | None = None) -> RunSummary:
    cfg, d = job.cfg, job.data
    kept = probe is not None and result.best_epoch == 0
    best = probe if kept else next((h for h in result.history if h["epoch"] == result.best_epoch), {})
    return RunSummary(
        run_dir=str(job.run_dir), backbone=job.card.name, unfreeze=cfg.unfreeze,
        epochs_trained=len(result.history), epochs=cfg.epochs, best_epoch=result.best_epoch,
        best_val_acc=best.get("val_acc"), stopped_early=result.stopped_early, lp_init=cfg.lp_init,
        lp_train_accuracy=(model.lp_report or {}).get("train_accuracy"), device=str(job.dev),
        train_images=len(d.train), val_images=len(d.val) if d.val else 0, val_source=d.val_source,
        classes=d.train.classes, trainable_parameters=model.n_trainable, seconds=round(result.seconds, 2),
        seconds_this_invocation=round(time.perf_counter() - job.t_start, 2),
        fingerprint=result.backbone.fingerprint if result.backbone is not None else None,
        head=str(result.head_path) if result.head_path else None,
        skipped=[{"path": p, "reason": r} for p, r in d.skipped],
        probe_val_acc=probe["val_acc"] if probe else None, kept_probe=kept, plan=job.plan, kept_last=kept_last)


def _train(job: TrainJob) -> FinetuneResult:
    """Build, restore, train, export: the steps of a run, in the order that keeps seeds reproducible."""
    if not job.resumed:
        _write_manifest(job)
    model = _build_model(job)
    trainer = _make_trainer(job, model.net)
    state = _restore(job, model, trainer)
    if job.extended:
        save_extended_config(job.run_dir, job.cfg)
    log.info("training %d of %d parameters (unfreeze=%s) on %s", model.n_trainable,
             sum(p.numel() for p in model.net.parameters()), job.cfg.unfreeze, job.dev)
    _status(job, "training", state.start)
    _score_probe(job, model, trainer, state)
    _run_epochs(job, model, trainer, state)
    return _finish(job, model, state)
