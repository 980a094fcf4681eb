"""The torch side of fine-tuning: network, trainable blocks, optimiser, schedule, epochs, checkpoints.

The network is ``make_wrapper(backbone)`` (uint8 NHWC -> embedding, the
module that gets exported) followed by a linear layer, so training,
evaluation and the ONNX export share one normalisation.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from featx.atomic import atomic_path
from featx.backbones.cards import BackboneCard
from featx.devices import choose_device
from featx.errors import FeatXError, require

log = logging.getLogger(__name__)

torch = require("torch", "torch")
nn = torch.nn


def torch_device(device: str) -> torch.device:
    """auto -> cuda when torch sees a GPU, else cpu; an explicit cuda without one raises."""
    return torch.device(choose_device(device, torch.cuda.is_available(), no_cuda_reason()))


def no_cuda_reason() -> str:
    """Why torch has no CUDA device here, and what to do: a CPU-only build, or no GPU it can see."""
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU-only build. Use --device cpu, or on a machine "
                "with an NVIDIA GPU install a CUDA build of torch.")
    return (f"torch {torch.__version__} is a CUDA {torch.version.cuda} build, but it sees no GPU "
            "(no NVIDIA GPU or driver on this machine, or CUDA_VISIBLE_DEVICES hides it). "
            "Use --device cpu.")


class FineTuneNet(nn.Module):
    """uint8 (N, S, S, 3) pixels -> class logits: the exportable feature module plus a linear head."""

    def __init__(self, features: nn.Module, dim: int, n_classes: int) -> None:
        super().__init__()
        self.features = features  # featx.backbones.export.make_wrapper(backbone, preprocess)
        self.head = nn.Linear(dim, n_classes)
        self.recipe = None  # the multi FeatureRecipe when ``features`` pools stages (LP-FT from that probe)

    def forward(self, x):
        return self.head(self.features(x))


def resolve_unfreeze(card: BackboneCard, unfreeze: int | str) -> int | None:
    """Number of card blocks to train; None means everything."""
    if unfreeze == "all":
        return None
    try:
        k = int(unfreeze)
    except (TypeError, ValueError):
        raise FeatXError(f"--unfreeze must be a number of blocks or 'all', got {unfreeze!r}") from None
    if k < 0:
        raise FeatXError(f"--unfreeze must be >= 0, got {k}")
    if k > len(card.blocks):
        raise FeatXError(f"--unfreeze {k}: {card.name} has {len(card.blocks)} unfreezable blocks; "
                         "use a smaller number or 'all'")
    return k


def card_block(model: nn.Module, card: BackboneCard, path: str) -> nn.Module:
    """The submodule a card's block path names (``blocks.6``), or a FeatXError naming the card."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise FeatXError(f"card {card.name}: block {path!r} is not in {card.arch}") from None


def card_model(net: FineTuneNet) -> nn.Module:
    """The card's model inside ``net`` (under the multi-feature module when there is one)."""
    backbone = net.features.backbone
    return backbone.backbone if getattr(net, "recipe", None) is not None else backbone


def trainable_modules(net: FineTuneNet, card: BackboneCard, k: int | None) -> list[nn.Module]:
    """The backbone modules that train: the top ``k`` card blocks, or the whole backbone."""
    backbone = card_model(net)
    if k is None:
        return [backbone]
    return [card_block(backbone, card, path) for block in card.blocks[:k] for path in block]


def set_trainable(net: FineTuneNet, card: BackboneCard, k: int | None) -> int:
    """Freeze everything but the head and the chosen blocks; returns the trainable parameter count."""
    for p in net.features.parameters():
        p.requires_grad_(False)
    for m in trainable_modules(net, card, k):
        for p in m.parameters():
            p.requires_grad_(True)
    for p in net.head.parameters():
        p.requires_grad_(True)
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def train_mode(net: FineTuneNet, bn_stats: bool = False) -> None:
    """train(), with BatchNorm layers in inference mode unless ``bn_stats`` lets trainable ones update.

    A frozen BN that kept updating its running statistics would change the
    features the head was fitted on (and the exported model) without any
    gradient step. Even in unfrozen blocks, batch statistics of small,
    augmented batches shift pretrained features enough to undo the LP init
    (measured on Fashion-MNIST, 10 images/class: 0.67 -> 0.48 test accuracy
    after 4 epochs at a learning rate of 1e-9), so pretrained runs keep them
    fixed and train only BN's affine weights. From scratch the statistics
    must be learnt (``bn_stats=True``). Dropout before the head still trains.
    """
    net.train()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            frozen = all(not p.requires_grad for p in m.parameters(recurse=False))
            if frozen or not bn_stats:
                m.eval()


def unit_depths(net: FineTuneNet, card: BackboneCard, k: int | None) -> dict[int, int]:
    """id(parameter) -> how many card blocks below the top its block is (0: the top block).

    With every block training, parameters outside the card's blocks count as the deepest.
    """
    units = card.blocks[:k] if k is not None else card.blocks
    depths = {}
    backbone = card_model(net)
    for i, block in enumerate(units):
        for path in block:
            for p in card_block(backbone, card, path).parameters():
                depths[id(p)] = i
    for p in backbone.parameters():
        depths.setdefault(id(p), len(units))
    return depths


def param_groups(net: FineTuneNet, lr: float, backbone_lr: float, weight_decay: float,
                 depths: dict[int, int] | None = None, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: head at ``lr``, backbone at ``backbone_lr``; no decay on biases and norms.

    ``layer_decay`` < 1 (with ``depths`` from ``unit_depths``): a block d blocks below the
    top trains at ``backbone_lr * layer_decay ** d``, so the early, general features move least.
    """
    groups: dict[tuple[bool, bool, int], list] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        head = name.startswith("head.")
        depth = 0 if head or layer_decay == 1.0 or depths is None else depths.get(id(p), 0)
        groups.setdefault((head, p.ndim > 1, depth), []).append(p)
    out = []
    for (head, decay, depth), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], not kv[0][1], kv[0][2])):
        base = "head" if head else "backbone" if depth == 0 else f"backbone.{depth}"
        out.append({"params": params, "lr": lr if head else backbone_lr * layer_decay ** depth,
                    "weight_decay": weight_decay if decay else 0.0,
                    "name": f"{base}{'' if decay else '-nodecay'}"})
    return out


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine down to 1% of the peak."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


class WeightAverage:
    """Exponential moving average of a network's weights: the copy a run validates, keeps and exports.

    The decay at step t is ``min(decay, (1 + t) / (10 + t))``, so the first steps follow the
    trained weights instead of holding on to the LP-initialised start. Buffers that are not
    floating point (BatchNorm's step count) are copied.
    """

    def __init__(self, net: nn.Module, decay: float) -> None:
        import copy

        self.net = copy.deepcopy(net).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.decay, self.steps = decay, 0
        self._pairs: tuple[list, list, list, list] | None = None

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """One step: average ``net``'s current weights in."""
        if self._pairs is None:  # the same tensors every step: pair them once
            mine, theirs = self.net.state_dict(), net.state_dict()
            floats = [k for k, v in mine.items() if v.is_floating_point()]
            others = [k for k, v in mine.items() if not v.is_floating_point()]
            self._pairs = ([mine[k] for k in floats], [theirs[k] for k in floats],
                           [mine[k] for k in others], [theirs[k] for k in others])
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        avg, cur, avg_other, cur_other = self._pairs
        torch._foreach_lerp_(avg, cur, 1.0 - d)
        for a, c in zip(avg_other, cur_other, strict=True):
            a.copy_(c)

    def state_dict(self) -> dict:
        return {"model": self.net.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        self.steps = int(state["steps"])


#: Beta(alpha, alpha) draws the mixing weight: 1 for CutMix (a uniform box area), 0.2 for mixup
#: (mostly light blends), as in the CutMix and mixup papers' ImageNet runs
CUTMIX_ALPHA, MIXUP_ALPHA = 1.0, 0.2


class BatchMix:
    """CutMix and mixup of training batches: each batch pairs every image with another of the batch.

    A batch gets CutMix (a box pasted from its partner, the weight its area) with chance
    ``cutmix``, else mixup (a pixel blend) with chance ``mixup``, else stays as it is. The
    loss is the weighted sum of the losses against both labels, so class weights and label
    smoothing still apply. Draws come from (seed, epoch, batch), so a resumed run mixes as
    the uninterrupted one would have. Pixels stay uint8: the network normalises them.
    """

    def __init__(self, cutmix: float = 0.0, mixup: float = 0.0, seed: int = 0) -> None:
        if not (0 <= cutmix <= 1 and 0 <= mixup <= 1 and cutmix + mixup <= 1):
            raise FeatXError(f"cutmix and mixup are chances per batch, together at most 1; got cutmix={cutmix}, "
                             f"mixup={mixup}")
        self.cutmix, self.mixup, self.seed = cutmix, mixup, seed

    def __call__(self, x, epoch: int, batch: int):
        """(mixed x, partner index or None, weight of the image's own label) for one batch."""
        rng = np.random.default_rng((self.seed, epoch, batch, 1))  # 4 numbers: apart from the crops' stream
        u = rng.random()
        if len(x) < 2 or u >= self.cutmix + self.mixup:
            return x, None, 1.0
        partner = torch.from_numpy(rng.permutation(len(x))).to(x.device)
        if u < self.cutmix:
            lam = rng.beta(CUTMIX_ALPHA, CUTMIX_ALPHA)
            h, w = x.shape[1:3]
            bh, bw = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
            cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
            top, bottom = max(0, cy - bh // 2), min(h, cy + (bh - bh // 2))
            left, right = max(0, cx - bw // 2), min(w, cx + (bw - bw // 2))
            x = x.clone()
            x[:, top:bottom, left:right] = x[partner, top:bottom, left:right]
            return x, partner, 1.0 - (bottom - top) * (right - left) / (h * w)  # the box as clipped
        lam = float(rng.beta(MIXUP_ALPHA, MIXUP_ALPHA))
        mixed = x.float().mul_(lam).add_(x[partner].float(), alpha=1.0 - lam)
        return mixed.round_().to(x.dtype), partner, lam


def to_device(net: FineTuneNet, dev: torch.device) -> FineTuneNet:
    net.to(dev)
    if dev.type == "cuda":
        # NHWC pixels permuted to NCHW already are channels_last in memory; make the weights match
        net.to(memory_format=torch.channels_last)
    return net


def autocast(dev: torch.device):
    """bf16 autocast on CUDA (no loss scaling needed); a no-op context on CPU."""
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


def run_epoch(net: FineTuneNet, loader, dev: torch.device, loss_fn, optimizer, scheduler,
              progress: Callable[[str, int, int], None], bn_stats: bool = False,
              on_steps: tuple[int, Callable[[int, int, float], None]] | None = None,
              stage: str = "epoch", average: WeightAverage | None = None,
              mix: BatchMix | None = None, epoch: int = 0) -> dict:
    """One training epoch; returns loss, accuracy, images and images/s.

    Reports ``progress(stage, batches done, batches)``; the run names the epoch in
    ``stage`` ("epoch 3/10"), so a bar shows which one, a resumed run's included.

    ``on_steps=(k, f)`` calls ``f(steps, images, seconds)`` once, after step ``k``
    (or at the end of a shorter epoch), timed from the end of the first step so
    that one-off warm-up costs do not count: what a time budget plans with. An
    epoch of a single step reports that step, warm-up included.

    ``average`` (--ema) takes in the weights after every optimiser step. ``mix``
    (--cutmix, --mixup) mixes each batch, drawn from ``epoch`` and the batch number.
    """
    train_mode(net, bn_stats)
    total = len(loader)
    n = correct = 0
    loss_sum = 0.0
    t0 = time.perf_counter()
    progress(stage, 0, total)
    t_first = n_first = None
    for b, batch in enumerate(loader):
        if batch is None:
            continue
        x, y = batch
        x = x.to(dev, non_blocking=True)
        y = y.to(dev, non_blocking=True)
        partner, lam = None, 1.0
        if mix is not None:
            x, partner, lam = mix(x, epoch, b)
        with autocast(dev):
            logits = net(x).float()
            loss = loss_fn(logits, y)
            if partner is not None:
                loss = lam * loss + (1.0 - lam) * loss_fn(logits, y[partner])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if average is not None:
            average.update(net)
        n += len(y)
        loss_sum += float(loss.detach()) * len(y)
        predicted = logits.argmax(1)
        hits = predicted == y
        if partner is not None:  # a mixed image counts as right in proportion to the label it hit
            hits = lam * hits + (1.0 - lam) * (predicted == y[partner])
        correct += float(hits.sum())
        progress(stage, b + 1, total)
        if on_steps is not None:
            if t_first is None:
                t_first, n_first, b_first = time.perf_counter(), n, b
            elif b - b_first >= on_steps[0] or b + 1 == total:
                on_steps[1](b - b_first, n - n_first, time.perf_counter() - t_first)
                on_steps = None
    secs = time.perf_counter() - t0
    if on_steps is not None and n:  # an epoch of one step: plan with all of it, warm-up included
        on_steps[1](total, n, secs)
    return {"train_loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1), "images": n,
            "seconds": secs, "images_per_second": n / secs if secs > 0 else 0.0}


@torch.no_grad()
def predict_logits(net: FineTuneNet, loader, dev: torch.device,
                   progress: Callable[[str, int, int], None] | None = None,
                   stage: str = "validate") -> tuple[np.ndarray, np.ndarray]:
    """(logits float32 (N, K), labels) over a centre-crop loader, in inference mode.

    Reports ``progress(stage, images, all images)``: images, not batches, so a rate
    reads as images per second.
    """
    net.eval()
    outs, ys = [], []
    per_batch = getattr(loader, "batch_size", None)
    images = len(getattr(loader, "dataset", ())) if per_batch else 0
    total = images or len(loader)
    for b, batch in enumerate(loader):
        if batch is not None:
            x, y = batch
            with autocast(dev):
                logits = net(x.to(dev, non_blocking=True))
            outs.append(logits.float().cpu().numpy())
            ys.append(y.numpy())
        if progress:
            # the images the loader has gone through (an unreadable one is dropped from its batch)
            progress(stage, min(total, (b + 1) * per_batch) if images else b + 1, total)
    k = net.head.out_features
    if not outs:
        return np.zeros((0, k), np.float32), np.zeros(0, np.int64)
    return np.concatenate(outs), np.concatenate(ys)


def evaluate(net: FineTuneNet, loader, dev: torch.device, loss_fn,
             progress: Callable[[str, int, int], None] | None = None) -> dict:
    logits, y = predict_logits(net, loader, dev, progress)
    if len(y) == 0:
        return {"val_loss": float("nan"), "val_acc": float("nan")}
    loss = float(loss_fn(torch.from_numpy(logits).to(dev), torch.from_numpy(y).to(dev)))
    return {"val_loss": loss, "val_acc": float((logits.argmax(1) == y).mean())}


# ---- checkpoints --------------------------------------------------------------------------

def rng_state() -> dict:
    """RNG states as tensors and plain numbers, so checkpoints load with weights_only=True."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
         "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    version, mt, gauss = s["python"]
    random.setstate((version, tuple(int(v) for v in mt.tolist()), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary name, then rename: a kill never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: Path) -> dict:
    try:
        # weights_only: a run directory from elsewhere must not be able to run code on --resume
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds (pickle, zip, weights_only refusals): all mean damaged
        raise FeatXError(f"{path}: unreadable checkpoint ({_first_line(e)}); it was damaged or not "
                         "written by featx. Remove it to restart the run from epoch 1") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "rng", "epoch", "history", "best_epoch", "best_key",
                   "bad_epochs")


def check_checkpoint(ckpt, path: Path) -> dict:
    """``ckpt`` if it has the shape of a featx last.pt; a FeatXError naming the file otherwise."""
    def bad(what: str) -> FeatXError:
        return FeatXError(f"{path}: not a checkpoint this run can continue from ({what}); it was damaged "
                          "or edited. Remove it to restart the run from epoch 1, or restore it")

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(ckpt, dict):
        raise bad("not a dictionary")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise bad(f"no {', '.join(missing)}")
    epoch, history = ckpt["epoch"], ckpt["history"]
    if not (count(epoch) and count(ckpt["best_epoch"]) and count(ckpt["bad_epochs"])):
        raise bad("epoch counters are not counts")
    if not (isinstance(history, list) and len(history) == epoch and all(
            isinstance(h, dict) and h.get("epoch") == i + 1 for i, h in enumerate(history))):
        raise bad(f"its history does not list epochs 1..{epoch}")
    best_key = ckpt["best_key"]
    if best_key is not None and not (isinstance(best_key, list) and len(best_key) == 2
                                     and all(isinstance(v, (int, float)) for v in best_key)):
        raise bad("best_key is not a pair of numbers")
    return ckpt


def restore_checkpoint(ckpt: dict, path: Path, net: nn.Module, optimizer, scheduler,
                       average: WeightAverage | None = None) -> None:
    """Load a checked last.pt into the network, optimiser, schedule, RNGs and weight average."""
    try:
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        if average is not None:
            average.load_state_dict(ckpt["ema"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise FeatXError(f"{path}: the checkpoint does not fit this run ({_first_line(e)}); it was damaged "
                         "or comes from another run. Remove it to restart the run from epoch 1") from None


def load_weights(net: nn.Module, path: Path, dev: torch.device) -> None:
    """best.pt into ``net``, or a FeatXError naming the file."""
    try:
        state = torch.load(path, map_location=dev, weights_only=True)
        net.load_state_dict(state)
    except Exception as e:  # as load_checkpoint: any failure here means a damaged or foreign file
        raise FeatXError(f"{path}: the best weights cannot be loaded ({_first_line(e)}); the file was "
                         "damaged or comes from another run") from None
