"""``featx extract``: a folder of images -> cached embeddings -> one table."""

from __future__ import annotations

import os
import time
from pathlib import Path

from featx.backbones.artifact import Backbone, with_decoder
from featx.backbones.resolve import card_features, resolve_backbone
from featx.embed.store import EmbeddingStore
from featx.embed.table import check_table_overwrite
from featx.engines.files import LocalEngine
from featx.engines.result import Engine, ExtractJob, ExtractResult, default_out, finish, scan_images
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
            decoder: str | None = None, shard_size: int = 2048, progress: ProgressFn = no_progress,
            write: bool = True,
            engine: str | Engine = "local", address: str | None = None,
            keep_embeddings: bool = True, follow_symlinks: bool = False,
            features: str | None = None, crop: str | None = None, force: bool = False) -> ExtractResult:
    """Embed every image under ``root`` (cached), write the table and a report.

    Parameters
    ----------
    root : folder of images; ``root/<class>/<image>`` gives labels. Or a CSV/TSV/Parquet
        table with a ``path`` column (relative to the table's folder, or absolute) and
        an optional ``label`` column (``featx.embed.scan.scan_table``).
    backbone : card name, export or run directory, ONNX file or ``Backbone`` (default: the
        default card).
    out : table to write (default ``./<folder or table name>.featx.parquet``); ``write=False``
        writes nothing.
    decoder : JPEG decoder, ``"simplejpeg"`` or ``"pillow"`` (default: the backbone's own,
        ``Preprocess.decoder``). Part of the fingerprint: each decoder has its own store entries.
    engine : ``"local"`` (threads here), ``"ray"`` (Ray tasks and actors on ``address``; featx[ray]), or an
        engine object such as ``featx.engines.ray.RayEngine(actors=4)``.
    keep_embeddings : False (the CLI's choice) writes the table without holding all
        embeddings in memory; ``result.table.X`` is then None.
    follow_symlinks : follow symbolic links into other class folders and out of ``root``
        too (labels still come from where the link sits). By default such links are
        skipped and listed in ``result.skipped`` and the report, so a link cannot
        change a label; see ``featx.embed.scan``.
    features, crop : the export of a backbone card: ``"last"`` or ``"multi"`` features
        (default for a card: ``DEFAULT_FEATURES``, multi), ``"center"`` or ``"none"`` crop
        (see ``featx.backbones.resolve.resolve_backbone``). An export directory or ONNX
        file gives the features it was made with.

    Returns
    -------
    ExtractResult
        The table (one row per image that could be embedded, in scan order), the
        paths written, and the stats; files that could not be read are listed with
        their reason in the report (``<out>.report.json``) and ``result.stats.failures``,
        paths the scan left out (links not followed, folders that cannot be listed, ...)
        in the report and ``result.skipped``.
    force : replace ``out`` even when it exists and is not a featx table (refused otherwise,
        before any work).
    """
    runner = _engine(engine, address)
    if batch_size < 1:
        raise FeatXError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    root = Path(root)
    out = out if out is not None else default_out(root)  # named after the folder or the table given
    if write:
        check_table_overwrite(out, force)
    progress("scan", 0, 0)
    found = scan_images(root, follow_symlinks)
    progress("backbone", 0, 0)
    bb = with_decoder(resolve_backbone(backbone, weights=weights, features=card_features(backbone, features),
                                       crop=crop), decoder)
    # found.root: the folder, or for a table of paths the folder its relative paths start from
    job = ExtractJob(root=found.root, found=found, backbone=bb, store=EmbeddingStore(bb, store),
                     batch_size=batch_size, workers=workers, device=device, draft=draft,
                     shard_size=shard_size, progress=progress)
    run = runner.run(job)
    return finish(job, run, t0, out, write, engine=runner.name, keep_embeddings=keep_embeddings)
