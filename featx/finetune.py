"""``featx finetune``: LP-FT fine-tuning of a backbone card, exported back to ONNX.

The recipe (Kumar et al. 2022, "LP-FT"): fit a logistic-regression head on
cached embeddings of the frozen backbone, fold its scaler into a new linear
layer, then train that layer together with the top ``unfreeze`` blocks of the
card. The network is ``make_wrapper(backbone)`` + linear, i.e. the very
module that is exported, so training, evaluation and the exported ONNX graph
share the card's preprocessing (uint8 pixels in, normalisation inside).

A run directory holds everything::

    config.json   split.json   last.pt (resumable)   best.pt
    metrics.csv   metrics.json   curve.png   lp_head.json
    backbone/     model.onnx + model.json: a backbone like any other (new fingerprint)
    head.joblib   the fine-tuned linear layer as a featx head for `featx predict`
    classifier.onnx + classifier.json: uint8 pixels -> class probabilities, one file
    summary.json  status.json
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cards import DEFAULT_BACKBONE, BackboneCard, Preprocess, get_card
from .errors import FeatXError, require
from .pipeline import ProgressFn, _noop
from .train_data import LabelledFiles, labelled_files, stratified_split

log = logging.getLogger(__name__)

FINETUNE_FORMAT = 1


@dataclass
class FinetuneConfig:
    """Every knob of a run; saved as ``config.json`` so ``--resume`` continues the same run."""

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    unfreeze: int | str = 2
    epochs: int = 10
    lr: float = 1e-3  # head
    backbone_lr: float | None = None  # default lr / 10: pretrained features move less than the head
    batch_size: int = 32
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    class_weight: str | None = "balanced"
    patience: int | None = 3  # epochs without val improvement before stopping; None: never
    val_fraction: float = 0.1
    lp_init: bool = True
    lp_C: float | str = "auto"
    pretrained: bool = True
    input_size: int | None = None  # override the card's input size (tests, quick CPU runs)
    crop_scale: float = 0.08  # smallest area fraction of the random crop (RandomResizedCrop scale)
    bn_stats: bool | None = None  # update BatchNorm statistics of trained blocks; None: only from scratch
    seed: int = 0

    def validate(self, card: BackboneCard) -> None:
        from .train_loop import resolve_unfreeze

        resolve_unfreeze(card, self.unfreeze)
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise FeatXError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or (self.backbone_lr is not None and not self.backbone_lr >= 0):
            raise FeatXError(f"learning rates must be > 0, got lr={self.lr}, backbone_lr={self.backbone_lr}")
        if not 0 <= self.val_fraction < 1:
            raise FeatXError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 < self.crop_scale <= 1:
            raise FeatXError(f"crop_scale must be in (0, 1], got {self.crop_scale}")
        if self.class_weight not in (None, "balanced"):
            raise FeatXError(f"class_weight must be 'balanced' or None, got {self.class_weight!r}")
        if self.input_size is not None and not 16 <= self.input_size <= 1024:
            raise FeatXError(f"input_size must be in 16..1024, got {self.input_size}")
        if self.lp_init and not self.pretrained:
            raise FeatXError("LP init needs pretrained weights; pass lp_init=False to train from scratch")


@dataclass
class FinetuneResult:
    """What a run produced. ``net`` is the best network, on CPU, in eval mode."""

    run_dir: Path
    classes: list[str]
    history: list[dict]
    best_epoch: int
    net: object
    preprocess: Preprocess
    backbone: object | None = None  # featx.backbone.Backbone of run_dir/backbone
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


def card_for(cfg: FinetuneConfig) -> BackboneCard:
    """The config's card, with its preprocessing scaled to ``input_size`` when overridden."""
    if os.sep in cfg.backbone or "/" in cfg.backbone or cfg.backbone.endswith(".onnx"):
        raise FeatXError(f"--backbone {cfg.backbone}: fine-tuning starts from a backbone card (an "
                         "architecture with torch weights; see `featx models`), not an ONNX file or "
                         "run directory; pass --weights FILE.pth to start from your own checkpoint")
    card = get_card(cfg.backbone)
    if cfg.input_size is None or cfg.input_size == card.preprocess.input_size:
        return card
    p = card.preprocess
    s = int(cfg.input_size)
    pre = dataclasses.replace(p, input_size=s, resize_size=max(s, round(s * p.resize_size / p.input_size)))
    return dataclasses.replace(card, preprocess=pre)


def _check_blocks(card: BackboneCard) -> None:
    """Raise if a card names a block its architecture does not have (random init, no weights)."""
    from .train_loop import _sub
    from .zoo import _instantiate

    model = _instantiate(card)
    for block in card.blocks:
        for path in block:
            try:
                _sub(model, path)
            except (AttributeError, IndexError):
                raise FeatXError(f"card {card.name}: block {path!r} is not in {card.arch}") from None


def default_run_dir(base: str | os.PathLike = "runs") -> Path:
    """runs/ft1, runs/ft2, ...: the first that does not exist."""
    base = Path(base)
    i = 1
    while (base / f"ft{i}").exists():
        i += 1
    return base / f"ft{i}"


# ---- LP init ----------------------------------------------------------------------------

def base_backbone(card: BackboneCard, module, weights_sha: str, weights: str | None):
    """The frozen starting backbone as an export (cached), for the LP head's embeddings."""
    from .backbone import load_export, resolve_backbone
    from .export import export_dir_for, write_export

    stock = get_card(card.name)
    if card.preprocess == stock.preprocess:
        return resolve_backbone(card.name, weights=weights)
    dest = export_dir_for(card, weights_sha).with_name(
        f"{export_dir_for(card, weights_sha).name}-{card.preprocess.input_size}px")
    if (dest / "model.json").is_file():
        meta = json.loads((dest / "model.json").read_text())
        if meta.get("card_digest") == card.digest():
            return load_export(dest)
    torch = require("torch", "torch")
    meta = {"name": f"{card.name}@{card.preprocess.input_size}px", "card": card.to_dict(),
            "card_digest": card.digest(), "weights": weights or card.weights,
            "weights_sha256": weights_sha, "dim": card.dim, "torch_version": torch.__version__}
    return load_export(write_export(module.eval(), card.preprocess, dest, meta))


def fit_lp_head(X: np.ndarray, y_names: list[str], classes: list[str], C: float | str,
                class_weight: str | None, seed: int):
    """The logistic-regression probe: featx.heads.fit_head, with C by CV when there is enough data."""
    from .heads import fit_head

    if C == "auto" and min(np.unique(y_names, return_counts=True)[1]) < 2:
        log.info("too few images per class to choose C by cross-validation; LP head uses C=1")
        C = 1.0
    pipe, report = fit_head(X, y_names, head="logreg", C=C, class_weight=class_weight, seed=seed)
    if report["classes"] != list(classes):
        missing = sorted(set(classes) - set(report["classes"]))
        raise FeatXError(f"no readable training image for classes {missing}; LP init needs every "
                         "class (fix the images, or pass --no-lp-init)")
    return pipe, report


def fold_head(pipe, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of a linear layer computing the head's logits from raw embeddings.

    The scaler is folded in: W' = W / scale, b' = b - W' @ mean. A binary
    logistic regression has one logit z; softmax([-z/2, z/2]) = sigmoid(z).
    """
    scaler, clf = pipe.named_steps["scaler"], pipe.named_steps["clf"]
    W = np.asarray(clf.coef_, dtype=np.float64)
    b = np.asarray(clf.intercept_, dtype=np.float64)
    if W.shape[0] == 1 and n_classes == 2:
        W = np.vstack([-W / 2, W / 2])
        b = np.array([-b[0] / 2, b[0] / 2])
    scale = np.asarray(scaler.scale_ if scaler.scale_ is not None else np.ones(W.shape[1]))
    mean = np.asarray(scaler.mean_ if scaler.mean_ is not None else np.zeros(W.shape[1]))
    W = W / scale[None, :]
    b = b - W @ mean
    return W.astype(np.float32), b.astype(np.float32)


def lp_init(net, card: BackboneCard, module_for_export, weights_sha: str, cfg: FinetuneConfig,
            train: LabelledFiles, store, device: str, progress: ProgressFn) -> tuple[dict, object]:
    """Fit the LP head on cached embeddings of the training images and load it into ``net.head``."""
    import torch

    from .pipeline import embed_files
    from .runtime import Encoder
    from .store import EmbeddingStore

    progress("backbone", 0, 0)
    bb = base_backbone(card, module_for_export, weights_sha, cfg.weights)
    encoder = Encoder(bb, device="cpu" if device == "cpu" else "auto")
    st = EmbeddingStore(bb, store)
    keys, stats = embed_files(train.paths, encoder, st, progress=progress)
    ok = [i for i, k in enumerate(keys) if k is not None]
    X = st.get([keys[i] for i in ok])
    names = [train.classes[train.labels[i]] for i in ok]
    progress("lp-init", 0, 1)
    pipe, report = fit_lp_head(X, names, train.classes, cfg.lp_C,
                               "balanced" if cfg.class_weight else None, cfg.seed)
    W, b = fold_head(pipe, len(train.classes))
    with torch.no_grad():
        net.head.weight.copy_(torch.from_numpy(W))
        net.head.bias.copy_(torch.from_numpy(b))
    progress("lp-init", 1, 1)
    report = {k: v for k, v in report.items() if k != "cv_grid"} | {
        "embedding_backbone": bb.name, "embedding_fingerprint": bb.fingerprint,
        "embedding_backbone_dir": str(bb.onnx_path.parent),
        "embedded": stats.embedded, "cached": stats.cached, "failed": len(stats.failures)}
    return report, pipe


# ---- run directory ------------------------------------------------------------------------

def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr_head", "lr_backbone",
                 "images", "seconds", "images_per_second"]


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    _write_json(run_dir / "metrics.json", history)
    tmp = run_dir / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, run_dir / "metrics.csv")


def plot_curve(run_dir: Path, history: list[dict], best_epoch: int) -> Path | None:
    """curve.png: loss and accuracy per epoch, train and validation."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a1.plot(ep, [h["val_loss"] for h in history], "s-", label="validation")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a2.plot(ep, [h["train_acc"] for h in history], "o-", label="train")
    a2.plot(ep, [h["val_acc"] for h in history], "s-", label="validation")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy")
    for a in (a1, a2):
        a.axvline(best_epoch, color="grey", ls=":", label=f"best (epoch {best_epoch})")
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(f"featx finetune: {run_dir.name}")
    fig.tight_layout()
    out = run_dir / "curve.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---- the run ------------------------------------------------------------------------------

@dataclass
class InitialNetwork:
    """The network before any training step (LP head loaded when asked)."""

    net: object
    card: BackboneCard
    weights_sha: str
    lp_report: dict | None = None
    lp_pipeline: object | None = None


def init_network(cfg: FinetuneConfig, train: LabelledFiles, *, store=None, device: str = "auto",
                 lp: bool | None = None, progress: ProgressFn = _noop) -> InitialNetwork:
    """Build the card's model (pretrained unless ``cfg.pretrained`` is off) plus a new linear layer.

    With ``lp`` (default ``cfg.lp_init``) the layer starts as the logistic
    regression fitted on cached embeddings of ``train``, scaler folded in.
    """
    from . import train_loop as tl
    from .export import make_wrapper
    from .zoo import build

    card = card_for(cfg)
    progress("model", 0, 0)
    backbone, _, wsha = build(card, cfg.weights, pretrained=cfg.pretrained)
    features = make_wrapper(backbone, card.preprocess)
    net = tl.FineTuneNet(features, card.dim, len(train.classes))
    init = InitialNetwork(net, card, wsha)
    if cfg.lp_init if lp is None else lp:
        init.lp_report, init.lp_pipeline = lp_init(net, card, features, wsha, cfg, train, store,
                                                   device, progress)
    return init


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
    from .images import array_to_pil

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
             export: bool = True, progress: ProgressFn = _noop,
             on_epoch: Callable[[dict], None] | None = None, **options) -> FinetuneResult:
    """Fine-tune a backbone card on labelled images; returns the run (and writes its directory).

    ``data`` is a folder in ImageFolder layout or a ``(paths, labels)`` pair;
    ``val`` likewise (default: a stratified ``val_fraction`` of ``data``).
    Options are ``FinetuneConfig`` fields (``unfreeze=2, epochs=10, lr=1e-3, ...``).
    ``resume=RUN_DIR`` continues an interrupted run from its last completed
    epoch with its saved config and split (``data``/options are then ignored).
    ``progress(stage, done, total)`` reports stages ``embed``, ``lp-init``,
    ``epoch`` (batches), ``validate`` and ``export``; ``on_epoch(row)`` gets
    each epoch's metrics. Ctrl-C raises ``FinetuneInterrupted`` (a
    KeyboardInterrupt) after the run directory is left consistent.
    """
    require("torch", "torch")
    from . import train_loop as tl

    t_start = time.perf_counter()
    dev = tl.torch_device(device)
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.json").is_file():
            raise FeatXError(f"--resume {run_dir}: not a featx fine-tuning run (no config.json)")
        status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").is_file() else {}
        if status.get("state") == "done":
            raise FeatXError(f"--resume {run_dir}: that run already finished ({status.get('epoch')} epochs); "
                             "start a new run with another --out")
        saved = json.loads((run_dir / "config.json").read_text())
        cfg = FinetuneConfig(**saved["config"])
        split = json.loads((run_dir / "split.json").read_text())
        train = LabelledFiles.from_dict(split["train"])
        valf = LabelledFiles.from_dict(split["val"]) if split.get("val") else None
        val_source = split.get("val_source", "")
        ckpt = tl.load_checkpoint(run_dir / "last.pt") if (run_dir / "last.pt").is_file() else None
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
                      workers, store, export, progress, on_epoch, t_start)
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
           export, progress, on_epoch, t_start) -> FinetuneResult:
    import torch

    from . import train_loop as tl
    from .train_data import ImageDataset, class_weights, make_loader

    classes = train.classes
    if resume is None:
        _write_json(run_dir / "split.json", {"train": train.to_dict(),
                                             "val": valf.to_dict() if valf else None,
                                             "val_source": val_source})
        _write_json(run_dir / "config.json", {"featx_finetune": FINETUNE_FORMAT,
                                              "config": dataclasses.asdict(cfg), "classes": classes,
                                              "card": card.to_dict()})

    tl.seed_everything(cfg.seed)
    init = init_network(cfg, train, store=store, device=device, lp=ckpt is None and cfg.lp_init,
                        progress=progress)
    net, wsha, lp_report = init.net, init.weights_sha, init.lp_report
    if lp_report is not None:
        _write_json(run_dir / "lp_head.json", lp_report)
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
        log.info("resuming %s after epoch %d", run_dir, start)
    log.info("training %d of %d parameters (unfreeze=%s) on %s", n_trainable,
             sum(p.numel() for p in net.parameters()), cfg.unfreeze, dev)
    _write_json(run_dir / "status.json", {"state": "training", "epoch": start, "epochs": cfg.epochs})

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
            _write_json(run_dir / "status.json", {"state": "training", "epoch": epoch, "epochs": cfg.epochs})
            if on_epoch is not None:
                on_epoch(dict(row, best_epoch=best_epoch))
    except KeyboardInterrupt:
        done = history[-1]["epoch"] if history else start
        _write_json(run_dir / "status.json", {"state": "interrupted", "epoch": done, "epochs": cfg.epochs})
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
        export_run(result, card, cfg, wsha)
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
    _write_json(run_dir / "summary.json", result.summary)
    _write_json(run_dir / "status.json", {"state": "done", "epoch": epoch, "epochs": cfg.epochs})
    return result


# ---- export back ------------------------------------------------------------------------

def linear_as_logreg(W: np.ndarray, b: np.ndarray):
    """A fitted sklearn LogisticRegression whose predict_proba is softmax(X W^T + b).

    Classes are the codes 0..K-1 (featx head convention). Two classes become
    one logit z = l1 - l0, since sklearn's binary model is sigmoid(z).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    W = np.asarray(W, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    clf = LogisticRegression()
    clf.classes_ = np.arange(len(W))
    if len(W) == 2:
        clf.coef_, clf.intercept_ = (W[1] - W[0])[None, :], np.array([b[1] - b[0]])
    else:
        clf.coef_, clf.intercept_ = W, b
    clf.n_features_in_ = W.shape[1]
    clf.n_iter_ = np.array([0])
    return Pipeline([("clf", clf)])


def export_run(result: FinetuneResult, card: BackboneCard, cfg: FinetuneConfig, weights_sha: str) -> None:
    """Write backbone/ (parity-checked ONNX, new fingerprint), head.joblib and classifier.onnx."""
    import torch

    from .backbone import load_export
    from .export import write_export

    net, run_dir = result.net, result.run_dir
    meta = {
        "name": f"{card.name}-ft-{run_dir.name}", "card": card.to_dict(), "card_digest": card.digest(),
        "weights": f"finetuned from {cfg.weights or card.weights}", "weights_sha256": weights_sha,
        "dim": card.dim, "torch_version": torch.__version__,
        "finetune": {"run_dir": str(run_dir.resolve()), "unfreeze": cfg.unfreeze,
                     "best_epoch": result.best_epoch, "lp_init": cfg.lp_init, "classes": result.classes},
    }
    result.backbone = load_export(write_export(net.features, card.preprocess, run_dir / "backbone", meta))
    W = net.head.weight.detach().numpy()
    b = net.head.bias.detach().numpy()
    pipe = linear_as_logreg(W, b)
    from .headfile import save_head

    best = next((h for h in result.history if h["epoch"] == result.best_epoch), {})
    result.head_path = save_head(run_dir / "head.joblib", pipe, result.classes, result.backbone, {
        "head": "finetuned-linear", "source": "featx finetune", "n_train": None,
        "best_epoch": result.best_epoch, "val_acc": best.get("val_acc"), "unfreeze": cfg.unfreeze})
    export_classifier(net, card.preprocess, result.classes, run_dir, result.backbone.fingerprint)


def export_classifier(net, pre: Preprocess, classes: list[str], run_dir: Path, fingerprint: str) -> Path:
    """classifier.onnx: uint8 NHWC pixels -> class probabilities, in one file, parity-checked."""
    import warnings

    import onnxruntime as ort
    import torch

    from .export import OPSET, parity_images

    model = torch.nn.Sequential(net, torch.nn.Softmax(dim=1)).eval()
    dest = run_dir / "classifier.onnx"
    tmp = run_dir / ".classifier.onnx.tmp"
    s = pre.input_size
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(2, s, s, 3, dtype=torch.uint8),), str(tmp), dynamo=False,
                          opset_version=OPSET, input_names=["pixels"], output_names=["probabilities"],
                          dynamic_axes={"pixels": {0: "batch"}, "probabilities": {0: "batch"}})
    x = parity_images(pre)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
    diff = float(np.abs(got - ref).max())
    if diff > 1e-4:
        tmp.unlink(missing_ok=True)
        raise FeatXError(f"classifier.onnx disagrees with torch (max prob diff {diff:.3g})")
    os.replace(tmp, dest)
    _write_json(run_dir / "classifier.json", {"classes": classes, "preprocess": pre.to_dict(),
                                              "input": {"name": "pixels", "dtype": "uint8", "layout": "NHWC"},
                                              "output": "probabilities", "backbone_fingerprint": fingerprint,
                                              "parity_max_abs_diff": diff})
    return dest


def predict_files(net, paths: list[str], pre: Preprocess, n_classes: int, batch_size: int = 64,
                  device: str = "cpu") -> np.ndarray:
    """Softmax of ``net`` over image files (centre crop); unreadable files give NaN rows."""
    import torch

    from .train_data import ImageDataset
    from .train_loop import autocast, torch_device

    dev = torch_device(device)
    net = net.to(dev).eval()
    ds = ImageDataset(LabelledFiles(list(paths), np.zeros(len(paths), np.int64), ["_"] * n_classes),
                      pre, train=False)
    out = np.full((len(paths), n_classes), np.nan, np.float32)
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            items = [(j, ds[j]) for j in range(i, min(i + batch_size, len(paths)))]
            ok = [(j, it[0]) for j, it in items if it is not None]
            if not ok:
                continue
            x = torch.from_numpy(np.stack([a for _, a in ok])).to(dev)
            with autocast(dev):
                p = torch.softmax(net(x).float(), dim=1).cpu().numpy()
            out[[j for j, _ in ok]] = p
    return out
