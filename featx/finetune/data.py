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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.backbones.cards import Preprocess
from featx.embed.images import content_key, decode, read_bytes, resize_crop
from featx.embed.scan import scan
from featx.errors import FeatXError, ImageError
from featx.progress import ProgressFn, no_progress

#: memory for decoded images kept between epochs (per dataset, in-process loading only): the 60k
#: Fashion-MNIST images take 141 MB decoded, so small images are decoded once per run, not per epoch
DECODED_CACHE_BYTES = 768 * 2**20

# RandomResizedCrop's usual ranges (torchvision/timm defaults)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# random erasing's ranges (Zhong et al. 2020; torchvision's RandomErasing defaults)
ERASE_SCALE = (0.02, 1 / 3)
ERASE_RATIO = (0.3, 1 / 0.3)


#: (path, reason) of a file left out of a run because it cannot be read or decoded
Skipped = tuple[str, str]


@dataclass
class LabelledFiles:
    """Absolute file paths with integer labels into ``classes``.

    ``keys`` are the files' content keys (``featx.embed.images.content_key``) once
    ``check_files`` has read them: a resumed run uses them to prove that its data
    did not move or change. ``skipped`` lists what the folder scan left out
    (symlink loops, ...) as ``(path, reason)``; a subset does not carry it.
    """

    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    keys: list[str] | None = None
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx) -> LabelledFiles:
        idx = np.asarray(idx, dtype=np.int64)
        keys = None if self.keys is None else [self.keys[i] for i in idx]
        return LabelledFiles([self.paths[i] for i in idx], self.labels[idx], self.classes, keys)

    @property
    def root(self) -> str:
        """The deepest folder holding every file."""
        return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in self.paths]) if self.paths else ""

    def to_dict(self) -> dict:
        """Paths relative to their common root, so a manifest cannot point outside it."""
        root = self.root
        rel = [os.path.relpath(os.path.abspath(p), root) for p in self.paths]
        d = {"root": root, "paths": rel, "labels": self.labels.tolist(), "classes": self.classes}
        return d if self.keys is None else d | {"keys": list(self.keys)}

    @classmethod
    def from_dict(cls, d: dict, root: str | os.PathLike | None = None, source: str = "split.json") -> LabelledFiles:
        """Inverse of to_dict, under ``root`` when given (data that moved); refuses anything malformed.

        A path that is absolute or climbs out of the root is refused, so a
        manifest cannot make a run read files outside its data folder.
        """
        if not isinstance(d, dict) or d.get("root") is None:
            raise FeatXError(f"{source} has no data root (made by an older featx, or edited); "
                             "start a new run")
        root = os.fspath(root) if root is not None else d["root"]
        paths, labels, classes, keys = (d.get("paths"), d.get("labels"), d.get("classes"), d.get("keys"))
        if not (_str_list(paths) and _str_list(classes) and isinstance(labels, list) and isinstance(root, str)
                and len(labels) == len(paths) and len(classes) >= 2
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(classes) for v in labels)
                and (keys is None or (_str_list(keys) and len(keys) == len(paths)))):
            raise FeatXError(f"{source} is damaged (paths, labels, classes or keys are not what featx wrote); "
                             "restore it from a backup or start a new run")
        out = []
        for p in paths:
            if os.path.isabs(p) or ".." in Path(p).parts:
                raise FeatXError(f"{source}: path {p!r} escapes the data root {root}; refusing to "
                                 "resume from a manifest that was edited or not written by featx")
            out.append(os.path.join(root, p))
        return cls(out, np.asarray(labels, dtype=np.int64), list(classes), keys)


@dataclass
class RunData:
    """The files a run trains and validates on, settled before any training."""

    train: LabelledFiles
    val: LabelledFiles | None
    val_source: str
    skipped: list[Skipped] = field(default_factory=list)  # files left out, (path, reason)


def _str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


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
        skipped = [(str(root / p), why) for p, why in found.skipped]
    else:
        try:
            paths, names = data
        except (TypeError, ValueError):
            raise FeatXError("training data must be a folder or a (paths, labels) pair") from None
        paths = [os.fspath(p) for p in paths]
        names = [str(n) for n in names]
        skipped = []
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
    return LabelledFiles(paths, np.array([index[n] for n in names], dtype=np.int64), list(classes),
                         skipped=skipped)


def check_files(files: LabelledFiles, pre: Preprocess, threads: int | None = None,
                progress: ProgressFn = no_progress) -> tuple[LabelledFiles, list[Skipped]]:
    """Read and decode every file once, as training will; the readable ones with their content keys.

    Returns the usable files (``keys`` filled in) and ``(path, reason)`` for the
    others, so a run knows before its first step how many images it really has
    and can say which ones it leaves out. Decoding uses the training draft size:
    what passes here decodes the same way in every epoch.
    """
    from concurrent.futures import ThreadPoolExecutor

    def check(path: str) -> tuple[str | None, str | None]:
        try:
            data = read_bytes(path)
            decode(data, path, draft_size=pre.resize_size)
            return content_key(data), None
        except ImageError as e:
            return None, e.reason

    keys: list[str | None] = []
    skipped: list[Skipped] = []
    progress("check", 0, len(files))
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1, thread_name_prefix="featx-check") as pool:
        for i, (key, why) in enumerate(pool.map(check, files.paths)):
            keys.append(key)
            if why is not None:
                skipped.append((files.paths[i], why))
            if (i + 1) % 256 == 0 or i + 1 == len(files):
                progress("check", i + 1, len(files))
    ok = [i for i, k in enumerate(keys) if k is not None]
    usable = files.subset(ok)
    usable.keys = [keys[i] for i in ok]
    return usable, skipped


def changed_files(files: LabelledFiles, threads: int | None = None,
                  progress: ProgressFn = no_progress) -> list[Skipped]:
    """``(path, 'missing' | 'changed' | reason)`` for every file whose bytes differ from its recorded key."""
    from concurrent.futures import ThreadPoolExecutor

    if files.keys is None:
        return []

    def problem(i: int) -> Skipped | None:
        path = files.paths[i]
        if not os.path.lexists(path):
            return (path, "missing")
        try:
            key = content_key(read_bytes(path))
        except ImageError as e:
            return (path, e.reason)
        return None if key == files.keys[i] else (path, "changed")

    out: list[Skipped] = []
    progress("verify", 0, len(files))
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1, thread_name_prefix="featx-check") as pool:
        for i, p in enumerate(pool.map(problem, range(len(files)))):
            if p is not None:
                out.append(p)
            if (i + 1) % 256 == 0 or i + 1 == len(files):
                progress("verify", i + 1, len(files))
    return out


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """'balanced' weights n / (k * count_c): rare classes count as much as common ones.

    sklearn's ``compute_class_weight`` refuses a class without examples; every
    class has training images here (``labelled_files`` takes the classes from the
    labels, and the validation split keeps one image of each class for training).
    """
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    if len(present) != n_classes:
        raise FeatXError(f"no training image for {n_classes - len(present)} of the {n_classes} classes; "
                         "every class needs at least one")
    return compute_class_weight("balanced", classes=np.arange(n_classes), y=labels).astype(np.float32)


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


def random_erase(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``arr`` (uint8 HxWxC) with one box of uniform random pixels, in random erasing's ranges."""
    h, w = arr.shape[:2]
    for _ in range(10):
        target = h * w * rng.uniform(*ERASE_SCALE)
        ratio = math.exp(rng.uniform(math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])))
        eh, ew = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < eh < h and 0 < ew < w:
            top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            out = arr.copy()
            out[top:top + eh, left:left + ew] = rng.integers(0, 256, (eh, ew, arr.shape[2]), dtype=np.uint8)
            return out
    return arr


class ImageDataset:
    """Map-style dataset: index -> (uint8 HxWx3 array, label), or None for an unreadable file.

    Augmentation randomness is drawn from (seed, epoch, index), so batches
    are the same whatever the number of loader workers, and a resumed run
    sees exactly the augmentations it would have seen. ``erase`` is the chance
    that a training image also gets one box of random pixels (``random_erase``).

    ``cache_bytes`` keeps what does not change between epochs in memory, up to
    that many bytes: the decoded image of a training file (its crop and flip
    are drawn anew each epoch), the finished pixels of an evaluation file.
    It pays only where the dataset lives in the training process (loader
    workers 0, the CPU default); worker processes would fill and drop copies.
    """

    def __init__(self, files: LabelledFiles, pre: Preprocess, train: bool, seed: int = 0,
                 crop_scale: float = CROP_SCALE[0], erase: float = 0.0, cache_bytes: int = 0) -> None:
        self.files = files
        self.crop_scale = crop_scale
        self.erase = erase
        self.pre = pre
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.cache_bytes = cache_bytes
        self._cache: dict[int, object] = {}
        self._cached = 0

    def _remember(self, i: int, value, nbytes: int) -> None:
        if self._cached + nbytes <= self.cache_bytes:
            self._cache[i] = value
            self._cached += nbytes

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int):
        path = self.files.paths[i]
        label = int(self.files.labels[i])
        hit = self._cache.get(i)
        if hit is not None and not self.train:
            return hit, label
        try:
            img = hit
            if img is None:
                img = decode(read_bytes(path), path, draft_size=self.pre.resize_size, decoder=self.pre.decoder)
                if self.train and self.cache_bytes:
                    self._remember(i, img, img.width * img.height * len(img.getbands()))
            if self.train:
                rng = np.random.default_rng((self.seed, self.epoch, i))
                box = random_box(img.width, img.height, rng, self.crop_scale)
                arr = resize_crop(img, self.pre, box=box, flip=bool(rng.random() < 0.5))
                if self.erase and rng.random() < self.erase:  # drawn last: runs without it keep their crops
                    arr = random_erase(arr, rng)
            else:
                arr = resize_crop(img, self.pre)
                if self.cache_bytes:
                    self._remember(i, arr, arr.nbytes)
        except ImageError:
            return None  # reported once by the loop; one bad file must not end training
        return arr, label


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
