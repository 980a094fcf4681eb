"""A near-duplicate threshold calibrated on the table itself (``featx duplicates``, ``featx audit``).

A fixed cosine threshold means different things on different data: a 512x512 photo
resized to 200x150 and saved at JPEG quality 70 keeps cosine 0.76 with its original
in the default embedding, while two distinct shirts of Fashion-MNIST can sit at 0.95.
So the threshold is measured per table:

1. a seeded sample of the table's own images is altered the ways copies are made
   (``ALTERATIONS``: resize with another aspect ratio, JPEG quality 50, an 80% crop,
   a mirror image, greyscale, a 10 degree rotation, and resize + JPEG 70 together),
   and the copies are embedded with the table's backbone (through the store, so a
   second run costs nothing);
2. how similar each copy stays to its original is compared with how similar the
   table's images are to their nearest *other* image (byte-identical files, which are
   copies for sure, are left out of that);
3. the threshold is the one that keeps the false pairs (distinct images at or above
   it) at most ``MAX_FALSE_RATE`` of the images and finds at least ``TARGET_RECALL``
   of the copies: the middle of the gap when there is one. When no threshold does
   both, the false-pair bound wins and the result says what recall it costs.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from featx.backbones.resolve import table_backbone
from featx.embed.images import decode, read_bytes
from featx.embed.scan import resolve_item_path
from featx.embed.table import EmbeddingTable
from featx.engines.files import embed_arrays
from featx.errors import FeatXError
from featx.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)

__all__ = ["ALTERATIONS", "MAX_FALSE_RATE", "TARGET_RECALL", "ThresholdChoice", "alter",
           "calibrate_threshold", "choose_threshold", "nearest_other"]

ALTERATIONS = ("resize-aspect", "jpeg-q50", "crop-80", "flip", "grayscale", "rotate-10",
               "resize-aspect+jpeg-q70")
TARGET_RECALL = 0.95
MAX_FALSE_RATE = 0.001
#: table images altered by default (x 7 alterations = copies embedded)
SAMPLE = 50
#: at most this many table rows are searched for their nearest other image
DISTINCT_QUERIES = 5000


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def _resize_aspect(img: Image.Image) -> Image.Image:
    """The issue's example: a 512x512 photo to 200x150. Small images are scaled up instead
    (28 px to 37x28): a copy is never smaller than a thumbnail."""
    w, h = img.size
    s = min(1.0, 150 / h)
    return img.resize((max(1, round(w * s * 4 / 3)), max(1, round(h * s))), Image.Resampling.BILINEAR)


def alter(img: Image.Image, how: str) -> np.ndarray:
    """``img`` (RGB) altered one of the ``ALTERATIONS`` ways, as a uint8 HxWx3 array."""
    w, h = img.size
    if how == "resize-aspect":
        out = _resize_aspect(img)
    elif how == "jpeg-q50":
        out = _jpeg(img, 50)
    elif how == "crop-80":
        dx, dy = round(w * 0.1), round(h * 0.1)
        out = img.crop((dx, dy, w - dx, h - dy))
    elif how == "flip":
        out = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif how == "grayscale":
        out = img.convert("L").convert("RGB")
    elif how == "rotate-10":
        out = img.rotate(10, resample=Image.Resampling.BILINEAR)
    elif how == "resize-aspect+jpeg-q70":
        out = _jpeg(_resize_aspect(img), 70)
    else:
        raise FeatXError(f"unknown alteration {how!r}; expected one of {', '.join(ALTERATIONS)}")
    return np.asarray(out.convert("RGB"), dtype=np.uint8)


@dataclass
class ThresholdChoice:
    """The calibrated threshold and what it was measured on.

    ``recall``: share of the altered copies at or above ``threshold``; ``false_rate``:
    share of the sampled table images whose nearest other image is at or above it;
    ``met``: both targets held; ``reason``: one line saying why this value.
    """

    threshold: float
    recall: float
    false_rate: float
    copies: int
    distinct: int
    met: bool
    reason: str
    per_alteration: dict[str, float] = field(default_factory=dict)
    unreadable: int = 0

    def summary(self) -> dict:
        return {"threshold": round(self.threshold, 6), "recall": self.recall, "false_rate": self.false_rate,
                "copies": self.copies, "distinct_images": self.distinct, "targets_met": self.met,
                "target_recall": TARGET_RECALL, "max_false_rate": MAX_FALSE_RATE,
                "per_alteration_recall": self.per_alteration, "unreadable": self.unreadable,
                "reason": self.reason}


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), np.float32(1e-12))


def nearest_other(X: np.ndarray, keys: list[str], rows: np.ndarray | None = None) -> np.ndarray:
    """Cosine similarity of each of ``rows`` (default: all) to its most similar other row of
    ``X`` that is not the same file (another content key)."""
    Xn = _unit(X)
    rows = np.arange(len(Xn)) if rows is None else rows
    key_ids = np.unique(np.asarray(keys, dtype=object), return_inverse=True)[1]
    out = np.full(len(rows), -1.0, np.float32)
    step = max(1, (64 << 20) // (4 * max(len(Xn), 1)))
    for s in range(0, len(rows), step):
        r = rows[s:s + step]
        S = Xn[r] @ Xn.T
        S[key_ids[r][:, None] == key_ids[None, :]] = -2.0  # itself and byte-identical copies
        out[s:s + step] = S.max(axis=1) if S.shape[1] else -1.0
    return out


def choose_threshold(copy_sim: np.ndarray, distinct_sim: np.ndarray, *,
                     target_recall: float = TARGET_RECALL,
                     max_false_rate: float = MAX_FALSE_RATE) -> tuple[float, bool, str]:
    """(threshold, both targets met, why) from the copies' and the distinct images' similarities."""
    if len(copy_sim) == 0:
        raise FeatXError("no altered copy could be made: the table's images cannot be read "
                         "(moved or deleted?); pass --threshold")
    d = np.sort(np.asarray(distinct_sim, np.float32))[::-1]
    allowed = int(np.floor(max_false_rate * len(d)))
    # the lowest threshold with at most `allowed` distinct images at or above it; the next
    # float32 up, since similarities are float32 and are compared in float32
    t_false = float(np.nextafter(d[allowed], np.float32(2.0))) if allowed < len(d) else -1.0
    c = np.sort(np.asarray(copy_sim, np.float64))
    miss = int(np.floor((1 - target_recall) * len(c)))
    t_recall = float(c[miss])  # the highest threshold still finding target_recall of the copies
    if t_recall >= t_false:
        t = (t_false + t_recall) / 2 if t_false > -1.0 else t_recall
        return t, True, (f"between {t_false:.4f} (the lowest with at most {max_false_rate:.1%} false "
                         f"pairs) and {t_recall:.4f} (the highest finding {target_recall:.0%} of the "
                         f"altered copies)")
    return t_false, False, (f"no threshold finds {target_recall:.0%} of the altered copies (that needs "
                            f"{t_recall:.4f}) with at most {max_false_rate:.1%} false pairs (that needs "
                            f">= {t_false:.4f}): kept the false-pair bound")


def _originals(t: EmbeddingTable, rows: np.ndarray) -> tuple[list[int], list[Image.Image], int]:
    root = t.meta.get("root")
    ok, images, bad = [], [], 0
    for i in rows.tolist():
        p = t.paths[i] if not root else resolve_item_path(root, t.paths[i])
        try:
            images.append(decode(read_bytes(p), str(p)))
            ok.append(i)
        except (OSError, FeatXError):
            bad += 1
    return ok, images, bad


def calibrate_threshold(t: EmbeddingTable, *, name: str | Path = "the table", backbone=None,
                        sample: int = SAMPLE, seed: int = 0, distinct_sim: np.ndarray | None = None,
                        store=None, device: str = "auto", batch_size: int = 32,
                        progress: ProgressFn = no_progress) -> ThresholdChoice:
    """Calibrate the near-duplicate threshold of table ``t`` (see the module doc).

    ``distinct_sim``: each row's similarity to its nearest other image, when the caller has
    already searched the table (else measured here on up to ``DISTINCT_QUERIES`` rows).
    ``backbone``: the backbone that made the table, when its recorded export is gone.
    """
    if t.X is None or len(t) < 2:
        raise FeatXError(f"{name}: calibrating a duplicate threshold needs a table of at least 2 images")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(len(t))[:sample])
    progress("calibrate threshold", 0, 3)
    ok, images, bad = _originals(t, rows)
    if not ok:
        raise FeatXError(f"{name}: none of the {len(rows)} sampled images could be read to make altered "
                         "copies (were they moved?); pass --threshold")
    bb = table_backbone(t.meta, Path(name), backbone)
    copies = [alter(im, how) for im in images for how in ALTERATIONS]
    progress("calibrate threshold", 1, 3)
    E = embed_arrays(copies, bb, device=device, store=store, batch_size=batch_size)
    progress("calibrate threshold", 2, 3)
    orig = _unit(t.X[np.repeat(ok, len(ALTERATIONS))])
    copy_sim = np.sum(_unit(E) * orig, axis=1)
    if distinct_sim is None:
        q = np.sort(rng.permutation(len(t))[:DISTINCT_QUERIES])
        distinct_sim = nearest_other(t.X, t.keys, q)
    distinct_sim = distinct_sim[distinct_sim > -1.5]  # rows with no other file at all
    threshold, met, why = choose_threshold(copy_sim, distinct_sim)
    kinds = np.tile(np.arange(len(ALTERATIONS)), len(ok))
    per = {how: float(np.mean(copy_sim[kinds == j] >= threshold)) for j, how in enumerate(ALTERATIONS)}
    choice = ThresholdChoice(float(threshold), float(np.mean(copy_sim >= threshold)),
                             float(np.mean(distinct_sim >= threshold)) if len(distinct_sim) else 0.0,
                             len(copy_sim), len(distinct_sim), met, why, per, bad)
    progress("calibrate threshold", 3, 3)
    log.info("near-duplicate threshold %.4f: recall %.3f, false rate %.4f (%s)", choice.threshold,
             choice.recall, choice.false_rate, why)
    return choice
