"""``featx fit-head``: fit a head on an embeddings table and write the head file + report.

The table is named explicitly or is the one ``*.featx.parquet`` file in the working
folder (what ``featx extract DATA`` writes there); never a pointer to whatever was
extracted last somewhere else. The result says which table was read, what was
written, and any warning (a table whose classes look like split names is almost
always the parent folder of ``train/`` and ``test/``, extracted by mistake).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from featx.atomic import write_text
from featx.backbones.artifact import Backbone
from featx.backbones.resolve import resolve_backbone
from featx.errors import FeatXError, MismatchError
from featx.heads.headfile import HEAD_FILE, json_default, peek_header, save_head
from featx.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)

__all__ = ["SPLIT_NAMES", "FitTableResult", "find_table", "fit_table", "split_name_warning"]

TABLE_SUFFIX = ".featx.parquet"
HEAD_KINDS = ("logreg", "linear-svm", "svm-rbf", "sgd-logreg")
SPLIT_NAMES = frozenset({"train", "training", "test", "testing", "val", "valid", "validation", "dev"})


@dataclass
class FitTableResult:
    """What ``fit_table`` did: the table it read, the files it wrote, the fit's report."""

    table: Path
    head_file: Path
    report_file: Path
    report: dict
    replaced: bool = False  # an older head of the same table was overwritten
    warnings: list[str] = field(default_factory=list)
    card_file: Path | None = None  # the model card beside the head (featx.modelcard)


def find_table(folder: str | os.PathLike | None = None) -> Path:
    """The one ``*.featx.parquet`` table in ``folder`` (default: the working folder).

    None there, or several, is an error that says what to run or pass.
    """
    folder = Path.cwd() if folder is None else Path(folder)
    found = sorted(p for p in folder.glob(f"*{TABLE_SUFFIX}") if not p.name.startswith("."))
    if not found:
        raise FeatXError(f"no embeddings table (*{TABLE_SUFFIX}) in {folder}: run `featx extract "
                         "DATA/train` here first (it writes train.featx.parquet), or pass "
                         "--embeddings TABLE")
    if len(found) > 1:
        raise FeatXError(f"{len(found)} embeddings tables in {folder} ({', '.join(p.name for p in found)}); "
                         "say which one to train on with --embeddings TABLE")
    return found[0]


def split_name_warning(classes: list[str], meta: dict, table: Path) -> str | None:
    """A warning when every class name is a split name (train/test/val...), else None."""
    names = {str(c).strip().lower() for c in classes}
    if not names or not names <= SPLIT_NAMES:
        return None
    root = meta.get("root")
    pick = next((c for c in classes if str(c).lower() in ("train", "training")), sorted(classes)[0])
    folder = str(Path(root) / pick) if root else f"the {pick}/ folder"
    return (f"the classes of {table} are {', '.join(sorted(map(str, classes)))}: split names, not "
            f"classes. It looks like the folder above the splits was extracted; extract {folder} "
            f"instead (`featx extract {folder}`) and fit on that table.")


def table_backbone(meta: dict, table: Path, override: str | os.PathLike | Backbone | None) -> Backbone:
    """The backbone that made a table: ``override``, or the export its metadata names."""
    spec = override or meta.get("backbone_path") or meta.get("backbone")
    if not spec:
        raise FeatXError(f"{table}: no backbone recorded; pass --backbone")
    try:
        bb = resolve_backbone(spec)
    except FeatXError:
        if override or not meta.get("backbone"):
            raise
        bb = resolve_backbone(meta["backbone"])  # export dir gone: re-export the card
    fp = meta.get("fingerprint", "")
    if fp and bb.fingerprint != fp:
        raise MismatchError(f"{table} was extracted with backbone fingerprint {fp}, but {spec} has "
                            f"{bb.fingerprint}; pass the backbone that made it with --backbone, "
                            "or extract again")
    return bb


def check_overwrite(out: Path, table: Path, force: bool) -> bool:
    """Refuse to replace another table's head (or any other file) unless ``force``.

    Returns True when ``out`` holds a head of this same table (a refit replaces it).
    """
    if not out.exists():
        return False
    header = peek_header(out)
    source = ((header or {}).get("train") or {}).get("embeddings") if header else None
    same = source is not None and Path(str(source)) == table.resolve()
    if same or force:
        return True
    what = (f"a head trained on {source}" if source else "a head of unknown origin") if header \
        else "a file that is not a featx head"
    raise FeatXError(f"{out} already exists and holds {what}; pass --force to replace it, or "
                     "--out to write the new head elsewhere")


def fit_table(table: str | os.PathLike | None = None, *, head: str = "logreg",
              C: float | str = "auto", class_weight: str | None = None, cv: int | None = None,
              seed: int = 0, out: str | os.PathLike | None = None,
              backbone: str | os.PathLike | Backbone | None = None, force: bool = False,
              command: str | None = None, progress: ProgressFn = no_progress) -> FitTableResult:
    """Fit a head on an embeddings table; write ``out`` (default ./head.joblib) and its report.

    ``table`` defaults to ``find_table()``. ``head="sgd-logreg"`` streams the table
    (memory for one shard; ``C`` is ignored, alpha is chosen on a held-out split).
    An existing ``out`` is replaced only if it is a head of the same table, or with
    ``force``. A model card (``head.README.md``, see ``featx.modelcard``) is written
    beside the head; ``command`` is the command line it records (None from Python).
    """
    if head not in HEAD_KINDS:
        raise FeatXError(f"unknown head {head!r}; expected one of {', '.join(HEAD_KINDS)}")
    path = Path(table) if table is not None else find_table()
    out_path = Path(out) if out is not None else Path(HEAD_FILE)
    if out_path.is_dir():
        out_path = out_path / HEAD_FILE
    replaced = check_overwrite(out_path, path, force)
    extras: dict = {}  # the novelty sample and conformal scores (featx.heads.fit.HeadFit)
    if head == "sgd-logreg":
        pipe, rep, meta = _fit_streaming(path, seed, progress)
    else:
        pipe, rep, meta = _fit_in_memory(path, head, C, class_weight, cv, seed, progress, extras)
    bb = table_backbone(meta, path, backbone)
    warnings = [w for w in [split_name_warning(rep["classes"], meta, path)] if w]
    for w in warnings:
        log.warning(w)
    rep["embeddings"] = str(path.resolve())
    head_file = save_head(out_path, pipe, rep["classes"], bb, rep, **extras)
    report_file = write_text(head_file.with_name(head_file.name + ".report.json"),
                             _json(rep))
    card_file = _write_card(head_file, bb, rep, path, meta, command, warnings)
    return FitTableResult(path, head_file, report_file, rep, replaced, warnings, card_file)


def _write_card(head_file: Path, bb: Backbone, rep: dict, table: Path, meta: dict,
                command: str | None, warnings: list[str]) -> Path | None:
    """The head's model card; a card that cannot be written is a warning, never a lost head."""
    from featx.modelcard import write_head_card

    try:
        return write_head_card(head_file, bb, rep, table=table.resolve(), table_meta=meta, command=command)
    except OSError as e:
        warnings.append(f"the head is written, but not its model card: {e.strerror or e}")
        log.warning(warnings[-1])
        return None


def _json(d: dict) -> str:
    return json.dumps(d, indent=2, default=json_default)


def _fit_in_memory(path: Path, head: str, C, class_weight, cv: int | None, seed: int,
                   progress: ProgressFn, extras: dict) -> tuple[object, dict, dict]:
    from featx.embed.table import read_table
    from featx.heads.fit import fit_head_full

    t = read_table(path)
    if not t.labelled:
        raise FeatXError(f"{path}: the images have no labels; extract an ImageFolder "
                         "tree (root/<class>/<image>) to fit a head")
    fit = fit_head_full(t.X, t.labels, head=head, C=C, class_weight=class_weight, cv=cv,
                        seed=seed, progress=progress)
    extras.update(novelty=fit.novelty, conformal=fit.conformal)
    return fit.pipeline, fit.report, t.meta


def _fit_streaming(path: Path, seed: int, progress: ProgressFn) -> tuple[object, dict, dict]:
    from featx.heads.streaming import fit_streaming_head, table_meta

    pipe, rep = fit_streaming_head(path, seed=seed, progress=progress)
    d = {**rep.to_dict(), "head": "sgd-logreg", "n_train": rep.rows}
    return pipe, d, table_meta(path)
