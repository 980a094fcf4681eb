"""Training data for fine-tuning: labelled files, a stratified split, augmented uint8 batches.

Pixels come through ``featx.embed.images.decode`` + ``resize_crop``, the same
functions extraction and prediction use: evaluation is their centre crop,
training is a random box (RandomResizedCrop) and flip through the same
resampling. Batches are uint8 NHWC, exactly what the exported ONNX graph
takes, so normalisation lives in one place (``featx.backbones.export.make_wrapper``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx.backbones.cards import Preprocess
from featx.embed.images import decode, read_bytes, resize_crop
from featx.embed.scan import scan
from featx.errors import FeatXError, ImageError

# RandomResizedCrop's usual ranges (torchvision/timm defaults)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


@dataclass
class LabelledFiles:
    """Absolute file paths with integer labels into ``classes``."""

    paths: list[str]
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx) -> LabelledFiles:
        idx = np.asarray(idx, dtype=np.int64)
        return LabelledFiles([self.paths[i] for i in idx], self.labels[idx], self.classes)

    def to_dict(self) -> dict:
        """Paths relative to their common root, so a manifest cannot point outside it."""
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in self.paths]) if self.paths else ""
        rel = [os.path.relpath(os.path.abspath(p), root) for p in self.paths]
        return {"root": root, "paths": rel, "labels": self.labels.tolist(), "classes": self.classes}

    @classmethod
    def from_dict(cls, d: dict) -> LabelledFiles:
        """Inverse of to_dict; refuses a path that is absolute or climbs out of the root."""
        root = d.get("root")
        if root is None:
            raise FeatXError("this run's split.json has no data root (made by an older featx); "
                             "start a new run")
        paths = []
        for p in d["paths"]:
            if os.path.isabs(p) or ".." in Path(p).parts:
                raise FeatXError(f"split.json: path {p!r} escapes the data root {root}; refusing to "
                                 "resume from a manifest that was edited or not written by featx")
            paths.append(os.path.join(root, p))
        return cls(paths, np.asarray(d["labels"], dtype=np.int64), list(d["classes"]))


def labelled_files(data, classes: list[str] | None = None) -> LabelledFiles:
    """A folder in ImageFolder layout, or a ``(paths, labels)`` pair, as LabelledFiles.

    ``classes`` fixes the class order (e.g. the training classes for a
    validation folder); labels outside it are refused.
    """
    if isinstance(data, LabelledFiles):
        return data
    if isinstance(data, (str, os.PathLike)):
        found = scan(data)
        if not found.items:
            raise FeatXError(f"{data}: no images found")
        if not found.labelled:
            raise FeatXError(f"{data}: images are not in class folders; fine-tuning needs "
                             "the ImageFolder layout (DIR/<class>/<image>)")
        root = Path(data)
        paths = [str(root / it.path) for it in found.items]
        names = [it.label for it in found.items]
    else:
        try:
            paths, names = data
        except (TypeError, ValueError):
            raise FeatXError("training data must be a folder or a (paths, labels) pair") from None
        paths = [os.fspath(p) for p in paths]
        names = [str(n) for n in names]
        if len(paths) != len(names):
            raise FeatXError(f"{len(paths)} paths but {len(names)} labels")
    if classes is None:
        classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise FeatXError(f"labels {unknown[:5]} are not among the training classes {classes}")
    if len(classes) < 2:
        raise FeatXError(f"need at least 2 classes to train a classifier, found {classes}")
    return LabelledFiles(paths, np.array([index[n] for n in names], dtype=np.int64), list(classes))


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """'balanced' weights n / (k * count_c): rare classes count as much as common ones."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = len(labels) / (n_classes * np.maximum(counts, 1))
    return w.astype(np.float32)


def random_box(w: int, h: int, rng: np.random.Generator,
               min_scale: float = CROP_SCALE[0]) -> tuple[float, float, float, float]:
    """A RandomResizedCrop box (left, top, right, bottom) in source pixels, area >= min_scale."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(min_scale, CROP_SCALE[1])
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        cw, ch = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if cw <= w and ch <= h:
            left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            return (left, top, left + cw, top + ch)
    # fall back to the largest centred box within the ratio range, as torchvision does
    ratio = min(max(w / h, CROP_RATIO[0]), CROP_RATIO[1])
    cw, ch = (w, w / ratio) if w / h < ratio else (h * ratio, h)
    cw, ch = min(cw, w), min(ch, h)
    left, top = (w - cw) / 2, (h - ch) / 2
    return (left, top, left + cw, top + ch)


class ImageDataset:
    """Map-style dataset: index -> (uint8 HxWx3 array, label), or None for an unreadable file.

    Augmentation randomness is drawn from (seed, epoch, index), so batches
    are the same whatever the number of loader workers, and a resumed run
    sees exactly the augmentations it would have seen.
    """

    def __init__(self, files: LabelledFiles, pre: Preprocess, train: bool, seed: int = 0,
                 crop_scale: float = CROP_SCALE[0]) -> None:
        self.files = files
        self.crop_scale = crop_scale
        self.pre = pre
        self.train = train
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int):
        path = self.files.paths[i]
        try:
            img = decode(read_bytes(path), path, draft_size=self.pre.resize_size, decoder=self.pre.decoder)
            if self.train:
                rng = np.random.default_rng((self.seed, self.epoch, i))
                box = random_box(img.width, img.height, rng, self.crop_scale)
                arr = resize_crop(img, self.pre, box=box, flip=bool(rng.random() < 0.5))
            else:
                arr = resize_crop(img, self.pre)
        except ImageError:
            return None  # reported once by the loop; one bad file must not end training
        return arr, int(self.files.labels[i])


def collate(batch):
    """Stack (pixels, label) pairs into uint8 NHWC and int64 tensors, dropping unreadable files."""
    import torch

    ok = [b for b in batch if b is not None]
    if not ok:
        return None
    x = torch.from_numpy(np.stack([b[0] for b in ok]))
    y = torch.tensor([b[1] for b in ok], dtype=torch.int64)
    return x, y


def make_loader(ds: ImageDataset, batch_size: int, shuffle: bool, seed: int, epoch: int,
                workers: int, pin_memory: bool, drop_last: bool = False):
    """A DataLoader whose shuffling order depends only on (seed, epoch)."""
    import torch

    g = torch.Generator()
    g.manual_seed(seed * 1000003 + epoch)
    ds.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=workers,
        collate_fn=collate, pin_memory=pin_memory, drop_last=drop_last,
        persistent_workers=False,
    )
