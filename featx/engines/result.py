"""What every engine shares: the job it is given, what it returns, and the table it ends in.

``extract`` scans the folder and resolves the backbone into an ``ExtractJob``; an
engine (``LocalEngine``, ``RayEngine``) makes sure every readable file has an
embedding in the store and returns an ``EngineRun``; ``finish`` assembles the
table in scan order and writes it with its report, so a table does not depend on
which engine made it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from featx import __version__
from featx.atomic import write_text
from featx.backbones.artifact import Backbone
from featx.embed.images import IMAGE_EXTENSIONS
from featx.embed.scan import ScanResult, display_path, is_table_file, scan, scan_table
from featx.embed.store import EmbeddingStore
from featx.embed.table import EmbeddingTable, write_table
from featx.errors import FeatXError
from featx.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)


@dataclass
class EmbedStats:
    """Counts and timings of one embedding run; ``failures`` are (path, reason)."""

    files: int = 0
    cached: int = 0
    embedded: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds_hash: float = 0.0
    seconds_embed: float = 0.0
    seconds_model: float = 0.0  # summed over the threads or actors that ran the model


@dataclass
class ExtractJob:
    """One folder to embed with one backbone into one store: what an engine is given."""

    root: Path
    found: ScanResult
    backbone: Backbone
    store: EmbeddingStore
    batch_size: int = 32
    workers: int | None = None
    device: str = "auto"
    draft: bool = True
    shard_size: int = 2048
    progress: ProgressFn = no_progress


@dataclass
class EngineRun:
    """What an engine returns: each scanned file's content key (None = failed), stats, provider."""

    keys: list[str | None]
    stats: EmbedStats
    provider: str


class Engine(Protocol):
    """An execution engine: embeds a job's files into its store."""

    name: str

    def run(self, job: ExtractJob) -> EngineRun: ...


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
            "skipped": len(self.skipped),
            "rows": len(self.table),
            "classes": len(self.table.meta.get("classes", [])),
            "backbone": self.backbone.name,
            "fingerprint": self.backbone.fingerprint,
            "provider": self.provider,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.stats.embedded / self.stats.seconds_embed, 2)
            if self.stats.seconds_embed > 0 and self.stats.embedded else None,
            "out": display_path(str(self.out)) if self.out else None,
            "report": display_path(str(self.report)) if self.report else None,
        }


def scan_images(root: Path, follow_symlinks: bool = False) -> ScanResult:
    """The images of a folder (``embed.scan.scan``) or listed in a CSV/TSV/Parquet table
    (``embed.scan.scan_table``), refusing a set with no image in it (both engines start here)."""
    if is_table_file(root):
        found = scan_table(root)
        looked = "rows of the table whose file exists"
    else:
        found = scan(root, follow_symlinks=follow_symlinks)
        looked = f"{', '.join(sorted(IMAGE_EXTENSIONS))} and image signatures"
    if not found.items:
        skipped = f"; {len(found.skipped)} paths skipped, first {display_path(found.skipped[0][0])}: " \
                  f"{found.skipped[0][1]}" if found.skipped else ""
        raise FeatXError(f"{root}: no images found (looked for {looked}){skipped}")
    return found


def default_out(root: Path) -> Path:
    """``./<folder>.featx.parquet``, or ``./<table stem>.featx.parquet`` for a table of paths."""
    name = root.stem if is_table_file(root) else root.resolve().name
    return Path.cwd() / f"{name or 'images'}.featx.parquet"


def finish(job: ExtractJob, run: EngineRun, t0: float, out: str | os.PathLike | None, write: bool,
           engine: str = "local", keep_embeddings: bool = True) -> ExtractResult:
    """Assemble the table of every embedded image in scan order, write it and the report.

    Shared by every engine, so a table does not depend on which one made it.
    ``keep_embeddings=False`` streams the embeddings from the store to the file
    chunk by chunk (flat memory) and leaves ``result.table.X`` None.
    """
    root, found, bb, st = job.root, job.found, job.backbone, job.store
    keys, stats, provider = run.keys, run.stats, run.provider
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
        write_report(report_path, result, engine, found)  # type: ignore[arg-type]
    return result


def write_report(path: Path, result: ExtractResult, engine: str, found: ScanResult) -> None:
    """``<out>.report.json``: the summary, every file that failed and every path skipped, with reasons.

    Paths are printable text (``display_path``: bytes that are not UTF-8 as ``\\xNN``).
    """
    def listed(pairs: list[tuple[str, str]]) -> list[dict]:
        return [{"path": display_path(p), "reason": r} for p, r in pairs]

    report = {**result.summary(), "engine": engine, "root": display_path(str(found.root.resolve())),
              "failures": listed(result.stats.failures), "skipped": listed(found.skipped),
              "recognised_by_content": [display_path(p) for p in found.by_content]}
    try:
        write_text(path, json.dumps(report, indent=2))
    except OSError as e:
        raise FeatXError(f"cannot write the report {path}: {e.strerror or e}") from None
