"""``featx extract``: a folder of images -> cached embeddings -> one table."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .backbone import Backbone, resolve_backbone
from .errors import FeatXError
from .images import IMAGE_EXTENSIONS, ScanResult, scan
from .paths import home
from .pipeline import EmbedStats, ProgressFn, _noop, embed_files
from .runtime import Encoder
from .statcache import StatCache
from .store import EmbeddingStore
from .table import EmbeddingTable, write_table

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    table: EmbeddingTable
    out: Path | None
    report: Path | None
    backbone: Backbone
    provider: str
    stats: EmbedStats
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "images": self.stats.files,
            "embedded": self.stats.embedded,
            "cached": self.stats.cached,
            "failed": len(self.stats.failures),
            "rows": len(self.table),
            "classes": len(self.table.meta.get("classes", [])),
            "backbone": self.backbone.name,
            "fingerprint": self.backbone.fingerprint,
            "provider": self.provider,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.stats.embedded / self.stats.seconds_embed, 2)
            if self.stats.seconds_embed > 0 and self.stats.embedded else None,
            "out": str(self.out) if self.out else None,
            "report": str(self.report) if self.report else None,
        }


def scan_images(root: Path) -> ScanResult:
    """``images.scan``, refusing a folder with no image in it (both engines start here)."""
    found = scan(root)
    if not found.items:
        raise FeatXError(f"{root}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return found


def default_out(root: Path) -> Path:
    return Path.cwd() / f"{root.resolve().name or 'images'}.featx.parquet"


def extract(root: str | os.PathLike, backbone: str | os.PathLike | Backbone | None = None, *,
            out: str | os.PathLike | None = None, store: str | os.PathLike | None = None,
            weights: str | os.PathLike | None = None, batch_size: int = 32,
            workers: int | None = None, device: str = "auto", draft: bool = True,
            shard_size: int = 2048, progress: ProgressFn = _noop, write: bool = True,
            engine: str = "local", address: str | None = None,
            keep_embeddings: bool = True) -> ExtractResult:
    """Embed every image under ``root`` (cached), write the table and a report.

    The table has one row per image that could be embedded, in scan order;
    files that could not be read are listed with their reason in the report
    (``<out>.report.json``) and in ``result.stats.failures``. ``engine="ray"``
    runs the same stages on a Ray cluster (``address``; featx[ray]).
    ``keep_embeddings=False`` (the CLI's choice) writes the table without holding
    all embeddings in memory; ``result.table.X`` is then None.
    """
    if engine == "ray":
        from .engines.ray import extract as ray_extract

        return ray_extract(root, backbone, out=out, store=store, weights=weights,
                           batch_size=batch_size, workers=workers, device=device, draft=draft,
                           shard_size=shard_size, progress=progress, write=write, address=address,
                           keep_embeddings=keep_embeddings)
    if engine != "local":
        raise FeatXError(f"engine {engine!r} is not one of local, ray")
    if address is not None:
        raise FeatXError("address is for engine='ray'")
    t0 = time.perf_counter()
    root = Path(root)
    progress("scan", 0, 0)
    found = scan_images(root)
    progress("backbone", 0, 0)
    bb = resolve_backbone(backbone, weights=weights)
    encoder = Encoder(bb, device=device)
    st = EmbeddingStore(bb, store)
    files = [str(root / it.path) for it in found.items]
    keys, stats = embed_files(files, encoder, st, batch_size=batch_size, workers=workers,
                              draft=draft, flush_rows=shard_size, progress=progress,
                              stat_cache=StatCache(st.root, root))
    rel = {str(root / it.path): it.path for it in found.items}
    stats.failures = [(rel.get(p, p), why) for p, why in stats.failures]
    return finish(root, found, bb, st, keys, stats, encoder.provider, t0, out, write,
                  keep_embeddings=keep_embeddings)


def finish(root: Path, found: ScanResult, bb: Backbone, st: EmbeddingStore, keys: list[str | None],
           stats: EmbedStats, provider: str, t0: float, out: str | os.PathLike | None, write: bool,
           engine: str = "local", keep_embeddings: bool = True) -> ExtractResult:
    """Assemble the table of every embedded image in scan order, write it and the report.

    Shared by every engine, so a table does not depend on which one made it.
    ``keep_embeddings=False`` streams the embeddings from the store to the file
    chunk by chunk (flat memory) and leaves ``result.table.X`` None.
    """
    ok = [i for i, k in enumerate(keys) if k is not None]
    ok_keys: list[str] = [keys[i] for i in ok]  # type: ignore[misc]
    keep = keep_embeddings or not write
    table = EmbeddingTable(
        paths=[found.items[i].path for i in ok],
        labels=[found.items[i].label for i in ok],
        keys=ok_keys,
        X=st.get(ok_keys) if keep else None,
        meta={
            "featx_version": __version__, "backbone": bb.name, "fingerprint": bb.fingerprint,
            "dim": bb.dim, "preprocess": bb.preprocess.to_dict(), "root": str(root.resolve()),
            "classes": found.classes, "backbone_path": str(bb.onnx_path.parent),
        },
    )
    out_path = report_path = None
    if write:
        out_path = Path(out) if out else default_out(root)
        write_table(out_path, table, None if keep else st.iter_get(ok_keys, 4096))
        report_path = out_path.with_name(out_path.name + ".report.json")
    result = ExtractResult(table, out_path, report_path, bb, provider, stats,
                           time.perf_counter() - t0, found.skipped)
    if write:
        report = {**result.summary(), "engine": engine, "root": str(root.resolve()),
                  "failures": [{"path": p, "reason": r} for p, r in stats.failures],
                  "skipped": [{"path": p, "reason": r} for p, r in found.skipped]}
        report_path.write_text(json.dumps(report, indent=2))  # type: ignore[union-attr]
        remember_last(out_path, bb)  # type: ignore[arg-type]
    return result


def remember_last(out: Path, bb: Backbone) -> None:
    """Let `featx fit-head` default to the table of the last extract."""
    try:
        (home() / "last_extract.json").write_text(json.dumps(
            {"out": str(out.resolve()), "backbone": str(bb.onnx_path.parent), "fingerprint": bb.fingerprint}))
    except OSError as e:
        log.warning("could not record the last extract: %s", e)


def last_extract() -> dict | None:
    p = home() / "last_extract.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
