"""The training run: data and split, the epoch loop, checkpoints, resume, early stopping."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.backbones.artifact import Backbone
from featx.backbones.cards import Preprocess
from featx.errors import FeatXError, require
from featx.finetune.config import FINETUNE_FORMAT, FinetuneConfig, card_for, default_run_dir
from featx.finetune.data import LabelledFiles, labelled_files
from featx.finetune.export import export_run, predict_files
from featx.finetune.lp import init_network
from featx.finetune.runlog import plot_curve, write_json, write_metrics
from featx.progress import ProgressFn, no_progress
from featx.sampling import stratified_split

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """What a run produced. ``net`` is the best network, on CPU, in eval mode."""

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
    summary: dict = field(default_factory=dict)

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


def _prepare_data(data, val, cfg: FinetuneConfig) -> tuple[LabelledFiles, LabelledFiles | None, str]:
    files = labelled_files(data)
    if val is not None:
        return files, labelled_files(val, classes=files.classes), "given"
    if cfg.val_fraction <= 0:
        return files, None, "none"
    tr, va = stratified_split(files.labels, cfg.val_fraction, cfg.seed)
    if len(va) == 0:
        return files, None, "none (too few images to carve a validation split)"
    return files.subset(tr), files.subset(va), f"{cfg.val_fraction:.0%} of train, stratified"


def finetune(data=None, *, val=None, out: str | os.PathLike | None = None,
             config: FinetuneConfig | None = None, resume: str | os.PathLike | None = None,
             device: str = "auto", workers: int | None = None, store: str | os.PathLike | None = None,
             export: bool = True, progress: ProgressFn = no_progress,
             on_epoch: Callable[[dict], None] | None = None, **options) -> FinetuneResult:
    """Fine-tune a backbone card on labelled images; returns the run (and writes its directory).

    ``data`` is a folder in ImageFolder layout or a ``(paths, labels)`` pair;
    ``val`` likewise (default: a stratified ``val_fraction`` of ``data``).
    Options are ``FinetuneConfig`` fields (``unfreeze=2, epochs=10, lr=1e-3, ...``).
    ``resume=RUN_DIR`` continues an interrupted run from its last completed
    epoch with its saved config and split (``data`` is then ignored, and the
    only option allowed is ``epochs``: more epochs extend a run, even a
    finished one, stretching the cosine schedule from the current step).
    ``progress(stage, done, total)`` reports stages ``embed``, ``lp-init``,
    ``epoch`` (batches), ``validate`` and ``export``; ``on_epoch(row)`` gets
    each epoch's metrics. Ctrl-C raises ``FinetuneInterrupted`` (a
    KeyboardInterrupt) after the run directory is left consistent.
    """
    require("torch", "torch")
    from featx.finetune import loop as tl

    t_start = time.perf_counter()
    dev = tl.torch_device(device)
    extended = False
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.json").is_file():
            raise FeatXError(f"--resume {run_dir}: not a featx fine-tuning run (no config.json)")
        status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").is_file() else {}
        if set(options) - {"epochs"}:
            raise FeatXError(f"--resume {run_dir} continues the run with its saved options; only the "
                             f"number of epochs can change (got {sorted(set(options) - {'epochs'})})")
        saved = json.loads((run_dir / "config.json").read_text())
        cfg = FinetuneConfig(**saved["config"])
        split = json.loads((run_dir / "split.json").read_text())
        train = LabelledFiles.from_dict(split["train"])
        valf = LabelledFiles.from_dict(split["val"]) if split.get("val") else None
        val_source = split.get("val_source", "")
        ckpt = tl.load_checkpoint(run_dir / "last.pt") if (run_dir / "last.pt").is_file() else None
        trained = ckpt["epoch"] if ckpt is not None else 0
        epochs = options.get("epochs")
        if epochs is not None and int(epochs) <= trained:
            raise FeatXError(f"--resume {run_dir}: {trained} epoch(s) are already trained; "
                             f"--epochs must be more than that to extend the run")
        if epochs is not None and int(epochs) != cfg.epochs:
            # the cosine schedule is stretched to the new length from the current step on
            cfg = dataclasses.replace(cfg, epochs=int(epochs))
            extended = True
            write_json(run_dir / "config.json", dict(saved, config=dataclasses.asdict(cfg)))
        elif status.get("state") == "done":
            raise FeatXError(f"--resume {run_dir}: that run already finished ({trained} epochs); extend it "
                             f"with --resume {run_dir} --epochs N (N > {trained}), or start a new run "
                             "with another --out")
    else:
        if data is None:
            raise FeatXError("no training data given (a folder or a (paths, labels) pair)")
        known = {f.name for f in dataclasses.fields(FinetuneConfig)}
        if set(options) - known:
            raise FeatXError(f"unknown fine-tuning options {sorted(set(options) - known)}; "
                             f"expected FinetuneConfig fields: {', '.join(sorted(known))}")
        cfg = dataclasses.replace(config or FinetuneConfig(), **options)
        run_dir = Path(out) if out is not None else default_run_dir()
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FeatXError(f"{run_dir} already exists and is not empty; pass another --out, or "
                             f"--resume {run_dir} to continue that run")
        data = arrays_as_files(data, run_dir / "images" / "train")
        val = arrays_as_files(val, run_dir / "images" / "val")
        train, valf, val_source = _prepare_data(data, val, cfg)
        ckpt = None
    card = card_for(cfg)
    cfg.validate(card)
    k = tl.resolve_unfreeze(card, cfg.unfreeze)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_run(run_dir)
    try:
        return _train(cfg, card, k, train, valf, val_source, run_dir, resume, ckpt, dev, device,
                      workers, store, export, progress, on_epoch, t_start, extended)
    finally:
        lock.release()


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


def _train(cfg, card, k, train, valf, val_source, run_dir, resume, ckpt, dev, device, workers, store,
           export, progress, on_epoch, t_start, extended=False) -> FinetuneResult:
    import torch

    from featx.finetune import loop as tl
    from featx.finetune.data import ImageDataset, class_weights, make_loader

    classes = train.classes
    if resume is None:
        write_json(run_dir / "split.json", {"train": train.to_dict(),
                                             "val": valf.to_dict() if valf else None,
                                             "val_source": val_source})
        write_json(run_dir / "config.json", {"featx_finetune": FINETUNE_FORMAT,
                                              "config": dataclasses.asdict(cfg), "classes": classes,
                                              "card": card.to_dict()})

    tl.seed_everything(cfg.seed)
    init = init_network(cfg, train, store=store, device=device, lp=ckpt is None and cfg.lp_init,
                        progress=progress)
    net, wsha, lp_report = init.net, init.weights_sha, init.lp_report
    if lp_report is not None:
        write_json(run_dir / "lp_head.json", lp_report)
    elif (run_dir / "lp_head.json").is_file():
        lp_report = json.loads((run_dir / "lp_head.json").read_text())
    n_trainable = tl.set_trainable(net, card, k)
    bn_stats = (not cfg.pretrained) if cfg.bn_stats is None else bool(cfg.bn_stats)
    net = tl.to_device(net, dev)

    pin = dev.type == "cuda"
    if workers is None:
        workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if dev.type == "cuda" else 0
    train_ds = ImageDataset(train, card.preprocess, train=True, seed=cfg.seed, crop_scale=cfg.crop_scale)
    # drop a last batch of one: BatchNorm in training mode cannot normalise a single image
    drop_last = len(train) % cfg.batch_size == 1 and len(train) > 1
    steps = max(1, len(train) // cfg.batch_size if drop_last else -(-len(train) // cfg.batch_size))
    val_loader = None
    if valf is not None:
        val_loader = make_loader(ImageDataset(valf, card.preprocess, train=False), cfg.batch_size * 2,
                                 False, cfg.seed, 0, workers, pin)
    backbone_lr = cfg.backbone_lr if cfg.backbone_lr is not None else cfg.lr / 10
    optimizer = torch.optim.AdamW(tl.param_groups(net, cfg.lr, backbone_lr, cfg.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, tl.warmup_cosine(cfg.epochs * steps, round(cfg.warmup_epochs * steps)))
    weight = None
    if cfg.class_weight == "balanced":
        weight = torch.from_numpy(class_weights(train.labels, len(classes))).to(dev)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    val_loss_fn = torch.nn.CrossEntropyLoss()

    history: list[dict] = []
    start, best_epoch, best_key, bad = 0, 0, None, 0
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        tl.set_rng_state(ckpt["rng"])
        start, history = ckpt["epoch"], ckpt["history"]
        best_epoch, best_key, bad = ckpt["best_epoch"], ckpt["best_key"], ckpt["bad_epochs"]
        for g, base, lam in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            g["lr"] = base * lam(scheduler.last_epoch)  # the (possibly stretched) schedule at this step
        if extended:
            bad = 0  # an extended run gets its full patience again
        log.info("resuming %s after epoch %d", run_dir, start)
    log.info("training %d of %d parameters (unfreeze=%s) on %s", n_trainable,
             sum(p.numel() for p in net.parameters()), cfg.unfreeze, dev)
    write_json(run_dir / "status.json", {"state": "training", "epoch": start, "epochs": cfg.epochs})

    stopped_early = False
    epoch = start
    try:
        for epoch in range(start + 1, cfg.epochs + 1):
            if cfg.patience is not None and bad >= cfg.patience:
                stopped_early = True
                break
            loader = make_loader(train_ds, cfg.batch_size, True, cfg.seed, epoch, workers, pin, drop_last)
            row = {"epoch": epoch, **tl.run_epoch(net, loader, dev, loss_fn, optimizer, scheduler, progress,
                                                    bn_stats)}
            row.update({"val_loss": float("nan"), "val_acc": float("nan")})
            if val_loader is not None:
                row.update(tl.evaluate(net, val_loader, dev, val_loss_fn, progress))
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
            row["lr_head"] = lrs.get("head", lrs.get("head-nodecay"))
            row["lr_backbone"] = lrs.get("backbone", lrs.get("backbone-nodecay", 0.0))
            history.append(row)
            # best = highest val accuracy, ties to lower val loss; without val, the last epoch
            key = (row["val_acc"], -row["val_loss"]) if val_loader is not None else (epoch, 0.0)
            if best_key is None or tuple(key) > tuple(best_key):
                best_key, best_epoch, bad = list(key), epoch, 0
                tl.atomic_save(net.state_dict(), run_dir / "best.pt")
            else:
                bad += 1
            tl.atomic_save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "rng": tl.rng_state(), "epoch": epoch,
                            "history": history, "best_epoch": best_epoch, "best_key": best_key,
                            "bad_epochs": bad}, run_dir / "last.pt")
            write_metrics(run_dir, history)
            write_json(run_dir / "status.json", {"state": "training", "epoch": epoch, "epochs": cfg.epochs})
            if on_epoch is not None:
                on_epoch(dict(row, best_epoch=best_epoch))
    except KeyboardInterrupt:
        done = history[-1]["epoch"] if history else start
        write_json(run_dir / "status.json", {"state": "interrupted", "epoch": done, "epochs": cfg.epochs})
        raise FinetuneInterrupted(run_dir, done) from None

    if (run_dir / "best.pt").is_file():
        net.load_state_dict(torch.load(run_dir / "best.pt", map_location=dev, weights_only=True))
    net = net.to("cpu", memory_format=torch.contiguous_format).float().eval()
    plot_curve(run_dir, history, best_epoch)
    best = next((h for h in history if h["epoch"] == best_epoch), {})
    result = FinetuneResult(run_dir=run_dir, classes=classes, history=history, best_epoch=best_epoch,
                            net=net, preprocess=card.preprocess, lp_report=lp_report,
                            stopped_early=stopped_early)
    if export:
        progress("export", 0, 1)
        result.backbone, result.head_path = export_run(result.net, run_dir, result.classes, history,
                                                       best_epoch, card, cfg, wsha)
        progress("export", 1, 1)
    result.seconds = time.perf_counter() - t_start
    result.summary = {
        "run_dir": str(run_dir), "backbone": card.name, "unfreeze": cfg.unfreeze,
        "epochs_trained": len(history), "epochs": cfg.epochs, "best_epoch": best_epoch,
        "best_val_acc": best.get("val_acc"), "stopped_early": stopped_early,
        "lp_init": cfg.lp_init, "lp_train_accuracy": (lp_report or {}).get("train_accuracy"),
        "device": str(dev), "train_images": len(train), "val_images": len(valf) if valf else 0,
        "val_source": val_source, "classes": classes, "trainable_parameters": n_trainable,
        "seconds": round(result.seconds, 2),
        "fingerprint": result.backbone.fingerprint if result.backbone is not None else None,
        "head": str(result.head_path) if result.head_path else None,
    }
    write_json(run_dir / "summary.json", result.summary)
    write_json(run_dir / "status.json", {"state": "done", "epoch": len(history), "epochs": cfg.epochs})
    return result

