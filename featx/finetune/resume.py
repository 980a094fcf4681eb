"""``--resume``: read a run directory back, and refuse one that was damaged, edited or lost its data.

A run directory can come from elsewhere and can be edited, so nothing in it is
trusted blindly: config.json must hold the options featx writes, split.json
the files (relative to their data root, with each file's content key), and
last.pt a checkpoint (loaded with ``weights_only=True``). The data must still be
where the run found it, byte for byte: a moved or changed data folder is an
error before any training, not a run on other images (or none). Data that moved
is found again with ``root=NEW_DIR`` (``--root``), and must still match.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from featx.backbones.cards import BackboneCard
from featx.errors import FeatXError
from featx.finetune.config import FINETUNE_FORMAT, FinetuneConfig, card_for
from featx.finetune.data import LabelledFiles, RunData, Skipped, changed_files
from featx.finetune.runlog import plural, write_json
from featx.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)


def read_json(path: Path, what: str):
    """A run file's JSON content, or a FeatXError naming the file."""
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise FeatXError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except ValueError as e:  # includes UnicodeDecodeError
        raise FeatXError(f"{path}: {what} is not valid JSON ({e}); the run directory was damaged "
                         "or edited") from None


def saved_config(run_dir: Path) -> tuple[dict, FinetuneConfig, BackboneCard]:
    """config.json as written, the config in it, and its card (all checked)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise FeatXError(f"--resume {run_dir}: not a featx fine-tuning run (no config.json)")
    saved = read_json(path, "the run's config")
    version = saved.get("featx_finetune") if isinstance(saved, dict) else None
    if version not in range(1, FINETUNE_FORMAT + 1):
        raise FeatXError(f"{path}: not a featx fine-tuning config this version can read "
                         f"(featx_finetune={version!r}, expected 1..{FINETUNE_FORMAT})")
    try:
        cfg = FinetuneConfig.from_dict(saved.get("config"), str(path))
        card = card_for(cfg)
        cfg.validate(card)
    except FeatXError as e:
        msg = str(e)
        raise FeatXError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    return saved, cfg, card


def _moved(old_dir: str, old_root: str, new_root: str | None) -> str | None:
    """Where ``old_dir`` is now if ``old_root`` moved to ``new_root`` (None: it stays, or it is outside)."""
    if new_root is None:
        return None
    rel = os.path.relpath(old_dir, old_root)
    if rel == ".":
        return new_root
    return None if rel.split(os.sep)[0] == ".." else os.path.join(new_root, rel)


def _skipped_list(split: dict, source: str) -> list[Skipped]:
    items = split.get("skipped") or []
    if not (isinstance(items, list) and all(isinstance(d, dict) and isinstance(d.get("path"), str)
                                            and isinstance(d.get("reason"), str) for d in items)):
        raise FeatXError(f"{source}: 'skipped' is damaged; restore the file or start a new run")
    return [(d["path"], d["reason"]) for d in items]


def saved_data(run_dir: Path, root: str | os.PathLike | None = None,
               progress: ProgressFn = no_progress) -> RunData:
    """split.json's files under their recorded root (or ``root``), checked to be the same bytes."""
    path = run_dir / "split.json"
    if not path.is_file():
        raise FeatXError(f"--resume {run_dir}: no split.json; the run directory is incomplete, start a new run")
    split = read_json(path, "the run's split")
    if not isinstance(split, dict) or not isinstance(split.get("train"), dict):
        raise FeatXError(f"{path} is damaged (no 'train' files); restore it or start a new run")
    new_root = None
    if root is not None:
        if not Path(root).is_dir():
            raise FeatXError(f"--root {root}: not a folder")
        new_root = os.path.abspath(root)
    old_root = str(split["train"].get("root"))
    train = LabelledFiles.from_dict(split["train"], new_root, str(path))
    val = None
    if split.get("val"):
        v = split["val"]
        v_root = _moved(str(v.get("root")), old_root, new_root) if isinstance(v, dict) else None
        val = LabelledFiles.from_dict(v, v_root, str(path))
    data = RunData(train, val, str(split.get("val_source", "")), _skipped_list(split, str(path)))
    _check_unchanged(run_dir, data, old_root, new_root, progress)
    if new_root is not None and new_root != old_root:
        # the user named the new place and every file matched: later resumes find it without --root
        write_json(path, dict(split, train=train.to_dict(), val=val.to_dict() if val else None))
    return data


def _check_unchanged(run_dir: Path, data: RunData, old_root: str, new_root: str | None,
                     progress: ProgressFn) -> None:
    root = new_root or old_root
    if data.train.keys is None:
        if new_root is None:
            raise FeatXError(
                f"--resume {run_dir}: this run was started by an older featx that did not record the "
                f"files' content, so featx cannot tell whether {old_root} still holds the run's images. "
                f"Pass --root DIR (the data folder, {old_root} if it did not move) to resume with it")
        log.warning("resuming %s on %s without a content check (run made by an older featx)", run_dir, root)
        return
    files = [f for f in (data.train, data.val) if f is not None]
    problems = [p for f in files for p in changed_files(f, progress=progress)]
    total = sum(len(f) for f in files)
    if not problems:
        return
    if all(why == "missing" for _, why in problems) and len(problems) == total:
        example = os.path.relpath(data.train.paths[0], data.train.root)
        raise FeatXError(
            f"--resume {run_dir}: the run's data is gone from {root} (none of its {total} files is there). "
            f"If the folder moved, pass --root NEW_DIR, the folder that now holds {example}")
    shown = "; ".join(f"{p} ({why})" for p, why in problems[:3]) + (", ..." if len(problems) > 3 else "")
    raise FeatXError(
        f"--resume {run_dir}: the data under {root} changed since the run started: {len(problems)} of "
        f"{total} files are missing or differ ({shown}); resuming would train on other images than "
        "the run started with. Restore them, or start a new run")


def resume_job_parts(run_dir: Path, options: dict, root: str | os.PathLike | None, progress: ProgressFn):
    """``(cfg, card, data, run_dir, checkpoint, extended)`` of a run to continue, everything checked.

    ``options`` may only hold ``epochs``: more epochs than already trained
    extend the run.
    """
    from featx.finetune import loop as tl

    if set(options) - {"epochs"}:
        raise FeatXError(f"--resume {run_dir} continues the run with its saved options; only the "
                         f"number of epochs can change (got {sorted(set(options) - {'epochs'})})")
    _, cfg, card = saved_config(run_dir)
    status = read_json(run_dir / "status.json", "the run's status") if (run_dir / "status.json").is_file() else {}
    ckpt = None
    if (run_dir / "last.pt").is_file():
        ckpt = tl.check_checkpoint(tl.load_checkpoint(run_dir / "last.pt"), run_dir / "last.pt")
    trained = ckpt["epoch"] if ckpt is not None else 0
    epochs = options.get("epochs")
    extended = epochs is not None and int(epochs) != cfg.epochs
    if epochs is not None and int(epochs) <= trained:
        raise FeatXError(f"--resume {run_dir}: {plural(trained, 'epoch is', 'epochs are')} already trained; "
                         f"--epochs must be more than that to extend the run")
    if not extended and isinstance(status, dict) and status.get("state") == "done":
        raise FeatXError(f"--resume {run_dir}: that run already finished ({plural(trained, 'epoch')}); extend it "
                         f"with --resume {run_dir} --epochs N (N > {trained}), or start a new run "
                         "with another --out")
    data = saved_data(run_dir, root, progress)
    if extended:
        # the cosine schedule is stretched to the new length from the current step on
        # (config.json records it once the checkpoint is restored: see save_extended_config)
        cfg = dataclasses.replace(cfg, epochs=int(epochs))
    return cfg, card, data, run_dir, ckpt, extended


def save_extended_config(run_dir: Path, cfg: FinetuneConfig) -> None:
    """config.json with the new number of epochs of an extended run."""
    saved = read_json(run_dir / "config.json", "the run's config")
    write_json(run_dir / "config.json", dict(saved, config=dataclasses.asdict(cfg)))
