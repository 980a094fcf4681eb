"""``featx extract``: a folder of images -> cached embeddings -> one table."""

from __future__ import annotations

import os
import time
from pathlib import Path

from featx.backbones.artifact import Backbone
from featx.backbones.resolve import resolve_backbone
from featx.embed.store import EmbeddingStore
from featx.engines.local import LocalEngine
from featx.engines.result import Engine, ExtractJob, ExtractResult, finish, scan_images
from featx.errors import FeatXError
from featx.progress import ProgressFn, no_progress

__all__ = ["extract"]


def _engine(engine: str | Engine, address: str | None) -> Engine:
    if not isinstance(engine, str):
        if address is not None:
            raise FeatXError("address is for engine='ray'; give it to RayEngine(address=...)")
        return engine
    if engine == "ray":
        from featx.engines.ray import RayEngine

        return RayEngine(address=address)
    if engine != "local":
        raise FeatXError(f"engine {engine!r} is not one of local, ray")
    if address is not None:
        raise FeatXError("address is for engine='ray'")
    return LocalEngine()


def extract(root: str | os.PathLike, backbone: str | os.PathLike | Backbone | None = None, *,
            out: str | os.PathLike | None = None, store: str | os.PathLike | None = None,
            weights: str | os.PathLike | None = None, batch_size: int = 32,
            workers: int | None = None, device: str = "auto", draft: bool = True,
            shard_size: int = 2048, progress: ProgressFn = no_progress, write: bool = True,
            engine: str | Engine = "local", address: str | None = None,
            keep_embeddings: bool = True, features: str | None = None,
            crop: str | None = None) -> ExtractResult:
    """Embed every image under ``root`` (cached), write the table and a report.

    Parameters
    ----------
    root : folder of images; ``root/<class>/<image>`` gives labels.
    backbone : card name, export or run directory, ONNX file or ``Backbone`` (default: the
        default card).
    out : table to write (default ``./<folder>.featx.parquet``); ``write=False`` writes nothing.
    engine : ``"local"`` (threads here), ``"ray"`` (Ray Data on ``address``; featx[ray]), or an
        engine object such as ``featx.engines.ray.RayEngine(actors=4)``.
    keep_embeddings : False (the CLI's choice) writes the table without holding all
        embeddings in memory; ``result.table.X`` is then None.
    features, crop : the export of a backbone card: ``"last"`` or ``"multi"`` features,
        ``"center"`` or ``"none"`` crop (see ``featx.backbones.resolve.resolve_backbone``).

    Returns
    -------
    ExtractResult
        The table (one row per image that could be embedded, in scan order), the
        paths written, and the stats; files that could not be read are listed with
        their reason in the report (``<out>.report.json``) and ``result.stats.failures``.
    """
    runner = _engine(engine, address)
    if batch_size < 1:
        raise FeatXError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    root = Path(root)
    progress("scan", 0, 0)
    found = scan_images(root)
    progress("backbone", 0, 0)
    bb = resolve_backbone(backbone, weights=weights, features=features, crop=crop)
    job = ExtractJob(root=root, found=found, backbone=bb, store=EmbeddingStore(bb, store),
                     batch_size=batch_size, workers=workers, device=device, draft=draft,
                     shard_size=shard_size, progress=progress)
    run = runner.run(job)
    return finish(job, run, t0, out, write, engine=runner.name, keep_embeddings=keep_embeddings)
