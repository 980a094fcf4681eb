"""featx command line: parses options, calls the library, renders progress and results.

Every command is a library function first; nothing here computes anything.
"""

from __future__ import annotations

import logging
import sys

import click

from featx.cli.audit import audit_cmd
from featx.cli.cache import cache_cmd
from featx.cli.extract import export_cmd, extract_cmd, models_cmd
from featx.cli.finetune import compare_cmd, finetune_cmd
from featx.cli.heads import evaluate_cmd, export_classifier_cmd, fit_head_cmd, predict_cmd
from featx.cli.labelling import sufficiency_cmd, suggest_cmd
from featx.cli.plot import plot_cmd
from featx.cli.similarity import duplicates_cmd, neighbors_cmd
from featx.errors import FeatXError

log = logging.getLogger("featx")


class FeatXGroup(click.Group):
    """Turns featx errors into one clear line and exit code 1, and Ctrl-C into exit 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FeatXError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            from featx.cli.options import last_stage

            said = interrupted_message(ctx.invoked_subcommand or "", last_stage())
            click.echo(f"\ninterrupted: {said}", err=True)
            ctx.exit(130)


def interrupted_message(command: str, stage: str | None) -> str:
    """What Ctrl-C left behind, for ``command`` interrupted in ``stage`` (its last progress stage)."""
    if stage is not None and stage.rsplit("] ", 1)[-1].startswith("backbone"):
        return ("interrupted while the backbone was being exported (the first use of a backbone "
                "exports it to ONNX); nothing was embedded yet. The same command again starts the "
                "export over.")
    return INTERRUPTED.get(command, "nothing was written.")


# what Ctrl-C leaves behind, per command (finetune says it itself: which run, which epoch)
_CACHED = "the embeddings computed so far are cached; the same command again starts from them."
INTERRUPTED = {
    "extract": "everything embedded so far is saved; run the same command again to resume.",
    "predict": _CACHED,
    "evaluate": _CACHED,
    "compare": "the runs finished so far are kept in the report folder's JSON; the same command "
               "again resumes after them (embeddings are cached too).",
    "fit-head": "no head was written (an existing head file is unchanged).",
    "neighbors": _CACHED,
    "suggest": _CACHED + " No suggestions were written.",
    "sufficiency": "nothing was written.",
    "audit": "nothing was written (the altered copies embedded so far are cached).",
}


@click.group(cls=FeatXGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="featx")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """featx: transfer learning for images with a frozen ONNX backbone and cached embeddings."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if ctx.invoked_subcommand not in TRAINING_COMMANDS:
        _fixed_mmap_threshold()


# torch training allocates and frees large activation tensors every step: with a fixed
# mmap threshold each one is a fresh mmap, and page faults took half the CPU time
TRAINING_COMMANDS = {"finetune", "compare"}


# 1 MiB, not less: each image's decode and resize buffers (100 KiB-1 MiB) are then reused
# from the heap; at 128 KiB each was a fresh mmap, 2x the page faults and ~4% of the
# CPU of an extract, for the same flat peak memory (docs/performance.md, bench/memory.py)
MMAP_THRESHOLD = 1 << 20


def _fixed_mmap_threshold() -> None:
    """Keep peak memory flat on long runs (glibc only; a process-wide choice, so the CLI's).

    Reader threads allocate whole image files (MBs each); glibc's adaptive mmap
    threshold then serves them from per-thread heaps that fragment and grow
    with the number of files. A fixed threshold returns them to the OS.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


for _cmd in (models_cmd, export_cmd, extract_cmd, fit_head_cmd, predict_cmd, evaluate_cmd, export_classifier_cmd,
             finetune_cmd, compare_cmd, cache_cmd, neighbors_cmd, duplicates_cmd, plot_cmd,
             suggest_cmd, sufficiency_cmd, audit_cmd):
    main.add_command(_cmd)
