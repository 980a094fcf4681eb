"""Test-time flip: embeddings of the mirror images, for averaging a head's probabilities over both.

A left-right flip of the centre crop is what ``resize_crop(flip=True)`` makes (the
flip comes after the resample), so the mirror image is exactly the pixels that
prediction uses, reversed along the width. Flipped embeddings are computed, not
stored: the store holds one embedding per file's bytes, and that is the unflipped one.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from featx.embed.images import load_image
from featx.embed.runtime import Encoder
from featx.progress import ProgressFn, no_progress

TTA = ("none", "flip")


def flipped_embeddings(paths: list[str], encoder: Encoder, *, batch_size: int = 32,
                       workers: int | None = None, progress: ProgressFn = no_progress) -> np.ndarray:
    """float32 (N, dim): the embedding of each image file mirrored left to right, in input order.

    The files are decoded as featx decodes them everywhere (``load_image``);
    progress is reported as stage ``flip``.
    """
    pre = encoder.backbone.preprocess
    out = [np.zeros((0, encoder.backbone.dim), np.float32)]
    progress("flip", 0, len(paths))
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1, thread_name_prefix="featx-flip") as pool:
        for i in range(0, len(paths), batch_size):
            chunk = paths[i:i + batch_size]
            pix = np.stack(list(pool.map(lambda p: load_image(p, pre)[:, ::-1], chunk)))
            out.append(encoder(np.ascontiguousarray(pix)))
            progress("flip", i + len(chunk), len(paths))
    return np.concatenate(out)
