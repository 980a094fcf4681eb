"""Model cards: a README-style markdown page beside each head and in each fine-tuning run.

A card says what a model is and how it was made, for the person who finds the file
later: the backbone (name, fingerprint, licence of its weights, where the weights
came from, the published parameter count and ImageNet accuracy, the preprocessing),
the data (table, image folder, classes with their counts), the head and how its
hyperparameters were chosen, the metrics, the featx version, the date and the exact
command. Everything a user supplied (class names, paths) is escaped, so a class
called ``a|b`` cannot break a table.

Where the cards go:

- a head file ``NAME.featx`` gets ``NAME.README.md`` beside it (not ``README.md``: a
  head is written to the working folder by default, which often holds the user's own
  README, and several heads may share a folder);
- a fine-tuning run directory gets ``README.md`` (the folder is the run's own); it is
  written when training starts and rewritten with the final metrics at the end;
- ``featx evaluate`` records its metrics in the head's card, between two marker
  comments: one labelled result per evaluation set (a set evaluated again replaces its
  own result, never another set's), each saying whether the set overlaps the head's
  training rows. The results also travel as JSON in a comment inside the section, so
  the card is rewritten from data, not by parsing its markdown.

Every card is written atomically (``featx.atomic.write_text``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from featx.atomic import write_text
from featx.backbones.artifact import Backbone
from featx.backbones.cards import BackboneCard, Preprocess, Published
from featx.errors import FeatXError

log = logging.getLogger(__name__)

__all__ = ["RUN_CARD", "command_line", "head_card_path", "md_escape", "record_evaluation",
           "render_head_card", "render_run_card", "write_head_card", "write_run_card"]

RUN_CARD = "README.md"
HEAD_CARD_SUFFIX = ".README.md"
TEST_BEGIN = "<!-- featx:test-metrics -->"
TEST_END = "<!-- /featx:test-metrics -->"
EVALS_DATA = "<!-- featx:evaluations "  # + JSON list + " -->", inside the markers
EVALS_TITLE = "Evaluations"
_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|~])")
# an underscore starts or ends emphasis only at a word boundary; inside a word (resnet_50) it is text
_MD_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


# ---- small renderers ---------------------------------------------------------------------------

def md_escape(text: Any) -> str:
    """``text`` as literal markdown inline text: specials backslash-escaped, newlines as spaces.

    Safe in a table cell (``|`` becomes ``\\|``) and in running text.
    """
    s = _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).splitlines()))
    return _MD_UNDERSCORE.sub(r"\\_", s)


def command_line(argv: Sequence[str]) -> str:
    """The command as a user would type it again: ``featx`` and the arguments, shell-quoted."""
    return shlex.join(["featx", *[str(a) for a in argv]])


def _table(rows: Sequence[tuple[str, str]], head: tuple[str, str] = ("", "")) -> list[str]:
    """A two-column markdown table; values must already be markdown (escaped)."""
    return [f"| {head[0]} | {head[1]} |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]


def _code_block(text: str) -> list[str]:
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return [fence, text, fence, ""]


def _num(v: Any, fmt: str = ".4f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else format(v, fmt)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _version() -> str:
    from featx import __version__

    return __version__


def _made(command: str | None, what: str) -> list[str]:
    lines = ["## How it was made", ""]
    if command:
        try:
            where = f", run in {md_escape(os.getcwd())}"
        except OSError:  # the working folder was deleted under us
            where = ""
        lines += [f"{what} by this command{where}:", "", *_code_block(command)]
    else:
        lines += [f"{what} through the Python API, or by a featx that did not record the command.", ""]
    return [*lines, f"featx {md_escape(_version())}, {_now()}.", ""]


# ---- the backbone --------------------------------------------------------------------------------

def _published(pub: Mapping[str, Any] | Published | None) -> str:
    if pub is None:
        return "not recorded"
    try:
        p = pub if isinstance(pub, Published) else Published.from_dict(dict(pub))
    except (FeatXError, TypeError, ValueError):
        return "not recorded (unreadable)"
    top1 = f", ImageNet-1k top-1 {p.imagenet_top1:g}%" if p.imagenet_top1 is not None else ""
    src = f" ([source]({p.source}))" if p.source else ""
    return f"{p.params_label} parameters ({p.params:,}, with the ImageNet classifier){top1}{src}"


def _preprocessing(pre: Preprocess) -> str:
    if pre.crop == "none":
        geometry = f"whole image resized to {pre.input_size}x{pre.input_size} ({pre.interpolation})"
    else:
        geometry = (f"shorter side resized to {pre.resize_size} ({pre.interpolation}), "
                    f"centre {pre.input_size}x{pre.input_size} cropped")
    mean = ", ".join(f"{v:g}" for v in pre.mean)
    std = ", ".join(f"{v:g}" for v in pre.std)
    return f"{geometry}; decoder {pre.decoder}; mean ({mean}), std ({std}) on 0-255, inside the graph"


def _features(rec: Mapping[str, Any] | None) -> str:
    if rec is None:
        return "last (the pooled final feature map)"
    return md_escape(f"{rec.get('name', 'multi')}: {rec.get('pooling', 'stages pooled into one vector')}")


def _licence(card: Mapping[str, Any] | None) -> str:
    if not card:
        return "unknown (not a featx card: check the licence of the model you imported)"
    return md_escape(card.get("license") or "not stated on the card")


def _card_dict(card: BackboneCard | Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    return card.to_dict() if isinstance(card, BackboneCard) else card


def backbone_rows(backbone: Backbone | None, card: BackboneCard | Mapping[str, Any] | None = None
                  ) -> list[tuple[str, str]]:
    """Table rows describing a backbone (an export) and the card it was made from."""
    side = backbone.sidecar if backbone is not None else None
    c = _card_dict(card) or (side.card if side is not None else None)
    rows: list[tuple[str, str]] = [
        ("name", md_escape(backbone.name if backbone is not None else (c or {}).get("name", "?")))]
    if c and c.get("description"):
        rows.append(("description", md_escape(c["description"])))
    if backbone is not None:
        rows.append(("fingerprint", f"`{backbone.fingerprint}`"))
    rows.append(("licence", _licence(c)))
    weights = (side.weights if side is not None and side.weights else None) or (c or {}).get("weights")
    rows.append(("weights", md_escape(weights or "your own ONNX file")))
    if c is not None:
        rows.append(("published", _published(c.get("published"))))
    pre = backbone.preprocess if backbone is not None else (
        card.preprocess if isinstance(card, BackboneCard) else None)
    if pre is not None:
        rows.append(("preprocessing", md_escape(_preprocessing(pre))))
    if side is not None:
        rows += [("features", _features(side.features)), ("embedding", f"{side.dim} floats, {side.precision}")]
    return rows


def _backbone_section(backbone: Backbone | None, card=None) -> list[str]:
    return ["## Backbone", "", *_table(backbone_rows(backbone, card)),
            "The licence is that of the backbone's pretrained weights, as its card states it: "
            "check that its terms fit your use of this model.", ""]


# ---- data, head, metrics -------------------------------------------------------------------------

def _class_table(counts: Mapping[str, Any], columns: Sequence[str] = ("images",)) -> list[str]:
    """One row per class; ``counts[c]`` is a number or a tuple of numbers (one per column)."""
    head = "| class | " + " | ".join(columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    rows = []
    for c, n in counts.items():
        vals = n if isinstance(n, (tuple, list)) else (n,)
        rows.append(f"| {md_escape(c)} | " + " | ".join("" if v is None else str(v) for v in vals) + " |")
    return [head, rule, *rows, ""]


def _split_name(root: str | None, table: Path | None) -> str:
    if root:
        return Path(root).name
    return table.name.split(".")[0] if table is not None else "?"


def _data_section(report: Mapping[str, Any], table: Path | None, meta: Mapping[str, Any]) -> list[str]:
    root = meta.get("root")
    classes = list(report.get("classes") or [])
    counts = report.get("class_counts") or {}
    rows = [("embeddings table", md_escape(table) if table is not None else "n/a (in memory)")]
    if root:
        rows.append(("images", md_escape(root)))
    rows += [("split", md_escape(_split_name(root, table))),
             ("rows", str(report.get("n_train") or report.get("rows") or sum(counts.values()) or "?")),
             ("classes", str(len(classes)))]
    fixes = report.get("relabel")
    if fixes:  # featx fit-head --relabel
        rows.append(("corrections", md_escape(f"{fixes['relabelled']} relabelled, {fixes['dropped']} "
                                              f"dropped, from {fixes['file']}")))
    table_lines = _class_table({c: counts.get(c) for c in classes})
    return ["## Data", "", *_table(rows), *table_lines]


def _head_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = [("kind", md_escape(report.get("head", "?")))]
    if "C" in report:
        if report.get("C_auto"):
            how = (f"{report['C']:g}, chosen by stratified {report.get('cv_folds')}-fold CV over the "
                   f"head's log grid on {report.get('cv_rows')} rows ({report.get('cv_metric')})")
        else:
            how = f"{report['C']:g}, given"
        rows.append(("C", md_escape(how)))
    if "alpha" in report:
        rows.append(("alpha", md_escape(f"{report['alpha']:g}, chosen on a held-out split "
                                        f"({report.get('val_rows')} rows)")))
    rows.append(("class weight", md_escape(report.get("class_weight") or "none")))
    if "converged" in report:
        rows.append(("converged", "yes" if report["converged"] else "no (try a smaller C)"))
    rows.append(("input", f"{report.get('dim', '?')}-dim embeddings, standardised"))
    return rows


def _metric_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = []
    if report.get("C_auto") and "cv_score_mean" in report:
        rows.append((md_escape(f"CV {report.get('cv_metric', 'accuracy')} "
                               f"({report.get('cv_folds')}-fold, at the chosen C)"),
                     f"{_num(report['cv_score_mean'])} ± {_num(report.get('cv_score_std'))}"))
    if report.get("val_accuracy") is not None:
        rows.append(("held-out accuracy", _num(report["val_accuracy"])))
    if report.get("train_accuracy") is not None:
        rows.append(("training accuracy", _num(report["train_accuracy"])))
    return rows or [("(none recorded)", "")]


def evaluation_record(metrics: Mapping[str, Any], metrics_file: str | os.PathLike | None = None
                      ) -> dict:
    """The part of ``featx evaluate``'s metrics a card keeps for one evaluation set."""
    ov = metrics.get("overlap") or {}
    keep = ("exact_checked", "exact", "near_checked", "near", "near_threshold", "notes")
    return {"root": metrics.get("root"), "n": metrics.get("n"), "accuracy": metrics.get("accuracy"),
            "balanced_accuracy": metrics.get("balanced_accuracy"), "macro_f1": metrics.get("macro_f1"),
            "ece": (metrics.get("calibration") or {}).get("ece"),
            "overlap": {k: ov[k] for k in keep if k in ov}, "disjoint": metrics.get("disjoint"),
            "held_out": metrics.get("held_out"), "evaluated": _now(),
            "metrics_file": str(Path(metrics_file).resolve()) if metrics_file else None}


def _overlap_label(r: Mapping[str, Any]) -> str:
    """One line that says what kind of result this is: held-out test or not."""
    ov, n = r.get("overlap") or {}, r.get("n")
    if not ov.get("exact_checked"):
        why = "; ".join(ov.get("notes") or []) or "not recorded"
        return f"**Overlap with the training rows not checked** ({md_escape(why)}): treat with care."
    exact, near = ov.get("exact", 0), ov.get("near", 0)
    cos = f"cosine >= {ov.get('near_threshold')}"
    if not exact and not near:
        copies = f"nor a near copy of one ({cos})" if ov.get("near_checked") else "near copies not checked"
        return f"**Held-out test set**: none of its {n} images is a training row, {copies}."
    near_txt = (f"{near} more near cop{'y' if near == 1 else 'ies'} ({cos})" if ov.get("near_checked")
                else "near copies not checked")
    d = r.get("disjoint") or {}
    if not exact:
        return (f"**Held-out test set, with near copies**: none of its {n} images is a training row, "
                f"but {near} have a near copy among them ({cos}); the second column leaves those out.")
    return (f"**Not a held-out test set**: {exact} of its {n} images are training rows of this head, "
            f"{near_txt}; the first column is not a test metric, the second is on the "
            f"{d.get('n', 0)} images disjoint from training.")


def _evaluation_lines(r: Mapping[str, Any]) -> list[str]:
    d = r.get("disjoint")
    names = ("images", "accuracy", "balanced accuracy", "macro F1", "ECE")
    keys = ("n", "accuracy", "balanced_accuracy", "macro_f1", "ece")
    fmt = {"n": "d"}
    lines = [f"### {md_escape(r.get('root', '?'))}", "", _overlap_label(r), ""]
    if d:
        lines += [f"| metric | all {r.get('n')} images | {d.get('n', 0)} disjoint from training |",
                  "|---|---|---|"]
        lines += [f"| {name} | {_num(r.get(k), fmt.get(k, '.4f'))} | {_num(d.get(k), fmt.get(k, '.4f'))} |"
                  for name, k in zip(names, keys, strict=True)]
        lines.append("")
    else:
        lines += _table([(name, _num(r.get(k), fmt.get(k, ".4f"))) for name, k in zip(names, keys, strict=True)],
                        ("metric", "value"))
    where = f"; details in {md_escape(r['metrics_file'])}" if r.get("metrics_file") else ""
    return [*lines, f"Evaluated {r.get('evaluated', '?')}{where}.", ""]


def _test_section(records: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """The evaluations part of a card: one labelled result per set, and the same as data."""
    if not records:
        body = ["No set evaluated yet: `featx evaluate HEAD TEST_FOLDER` records it here, one result "
                "per set.", ""]
    else:
        body = [line for r in records for line in _evaluation_lines(r)]
    # JSON in an HTML comment: "--" may not appear inside one, and a JSON string can spell it \u002d
    data = json.dumps(list(records or ()), default=str).replace("--", "-\\u002d")
    return [TEST_BEGIN, f"## {EVALS_TITLE}", "", *body, f"{EVALS_DATA}{data} -->", TEST_END, ""]


def _records(section: str) -> list[dict]:
    """The evaluation records stored in a card's evaluations section (none from older cards)."""
    start = section.find(EVALS_DATA)
    if start < 0:
        return []
    end = section.find(" -->", start)
    try:
        got = json.loads(section[start + len(EVALS_DATA):end])
    except ValueError:
        return []
    return [r for r in got if isinstance(r, dict)] if isinstance(got, list) else []


# ---- head cards -----------------------------------------------------------------------------------

def head_card_path(head_file: str | os.PathLike) -> Path:
    """Where the card of a head file goes: ``head.featx`` -> ``head.README.md`` beside it."""
    p = Path(head_file)
    return p.with_name(p.stem + HEAD_CARD_SUFFIX)


def render_head_card(backbone: Backbone, report: Mapping[str, Any], *, head_file: str | os.PathLike,
                     table: str | os.PathLike | None = None, table_meta: Mapping[str, Any] | None = None,
                     command: str | None = None) -> str:
    """The markdown card of a head fitted on ``backbone`` embeddings.

    Parameters
    ----------
    report
        The fit's report (``featx.heads.fit.fit_head`` or the streaming head's): head
        kind, C and how it was chosen, classes and their counts, CV score.
    table, table_meta
        The embeddings table it was fitted on and its metadata (``root``: the images).
    command
        The command line that made it (``command_line(sys.argv[1:])``); None from Python.
    """
    name = Path(head_file).name
    lines = [f"# {md_escape(name)}", "",
             f"A {md_escape(report.get('head', '?'))} head on {md_escape(backbone.name)} embeddings, "
             f"{len(report.get('classes') or [])} classes. Use it with `featx predict` / `featx evaluate` "
             "or `featx.load_head`; it runs only on the backbone with the fingerprint below.", "",
             *_backbone_section(backbone), *_data_section(report, Path(table) if table else None,
                                                          table_meta or {}),
             "## Head", "", *_table(_head_rows(report)),
             "## Metrics", "", *_table(_metric_rows(report), ("metric", "value")),
             *_test_section(), *_made(command, "Fitted")]
    return "\n".join(lines)


def write_head_card(head_file: str | os.PathLike, backbone: Backbone, report: Mapping[str, Any], *,
                    table: str | os.PathLike | None = None, table_meta: Mapping[str, Any] | None = None,
                    command: str | None = None) -> Path:
    """Write ``head_card_path(head_file)`` (atomically); returns its path. See ``render_head_card``."""
    text = render_head_card(backbone, report, head_file=head_file, table=table, table_meta=table_meta,
                            command=command)
    return write_text(head_card_path(head_file), text)


def _card_of(head_file: Path) -> Path | None:
    """The card of a head: ``NAME.README.md`` beside it, or the run's README.md for a
    fine-tuning run's ``head.featx``."""
    own = head_card_path(head_file)
    if own.is_file():
        return own
    run_card = head_file.parent / RUN_CARD
    if (head_file.parent / "config.json").is_file() and run_card.is_file():
        return run_card
    return None


def record_evaluation(head_file: str | os.PathLike, metrics: Mapping[str, Any],
                      metrics_file: str | os.PathLike | None = None) -> Path | None:
    """Put ``metrics`` (``featx evaluate``'s) in the head's card, beside the results of other
    sets; an earlier result of the same set (the same folder or listing) is replaced.

    Returns the card's path, or None when the head has no card (made before cards
    existed, or by another tool), the card's test-metrics markers were edited away, or
    the card cannot be written (a warning says so: the update is optional).
    """
    path = _card_of(Path(head_file))
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    start, end = text.find(TEST_BEGIN), text.find(TEST_END)
    if start < 0 or end < start:
        log.warning("%s: no test-metrics section to update; the evaluation is in metrics.json", path)
        return None
    rec = evaluation_record(metrics, metrics_file)
    records = [r for r in _records(text[start:end]) if r.get("root") != rec["root"]] + [rec]
    section = "\n".join(_test_section(records)).rstrip("\n")
    try:
        return write_text(path, text[:start] + section + text[end + len(TEST_END):])
    except OSError as e:  # optional: the evaluation itself is written; say why the card is not
        log.warning("%s: could not update the head's card with this evaluation (%s); the metrics "
                    "are in %s", path, e.strerror or e, metrics_file or "the evaluation's output")
        return None


# ---- fine-tuning run cards -------------------------------------------------------------------------

def _config_rows(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(md_escape(k), md_escape("default" if v is None else v)) for k, v in config.items()]


def _run_metric_rows(summary: Mapping[str, Any] | None, history: Sequence[Mapping[str, Any]]
                     ) -> list[tuple[str, str]]:
    if summary is None:
        return [("state", "training (this card is rewritten with the final metrics when the run ends)")]
    best = next((h for h in history if h.get("epoch") == summary.get("best_epoch")), {})
    last = history[-1] if history else {}
    return [
        ("state", "done" + (" (stopped early: no improvement for `patience` epochs)"
                            if summary.get("stopped_early") else "")),
        ("epochs trained", f"{summary.get('epochs_trained')} of {summary.get('epochs')}"),
        ("best epoch", str(summary.get("best_epoch"))),
        ("validation accuracy (best epoch)", _num(summary.get("best_val_acc"))),
        ("validation loss (best epoch)", _num(best.get("val_loss"))),
        ("training accuracy (last epoch)", _num(last.get("train_acc"))),
        ("linear-probe training accuracy (LP init)", _num(summary.get("lp_train_accuracy"))),
        ("trainable parameters", f"{summary.get('trainable_parameters'):,}"
         if summary.get("trainable_parameters") is not None else "n/a"),
        ("device", md_escape(summary.get("device"))),
        ("seconds", _num(summary.get("seconds"), ".1f")),
    ]


def render_run_card(run_dir: str | os.PathLike, card: BackboneCard, config: Mapping[str, Any], *,
                    train_counts: Mapping[str, int], val_counts: Mapping[str, int] | None,
                    data: Mapping[str, Any], summary: Mapping[str, Any] | None = None,
                    history: Sequence[Mapping[str, Any]] = (), backbone: Backbone | None = None,
                    command: str | None = None, resumed_with: Sequence[str] = ()) -> str:
    """The markdown card of a fine-tuning run.

    ``data`` holds ``train_root``, ``val_source`` and ``skipped`` (a count);
    ``summary`` is None while the run trains (the card then says so) and the run's
    summary.json content at the end; ``backbone`` is the exported run backbone.
    """
    run_dir = Path(run_dir)
    classes = list(train_counts)
    counts = {c: (train_counts.get(c), (val_counts or {}).get(c)) for c in classes}
    data_rows = [("training images", md_escape(data.get("train_root", "?"))),
                 ("validation", md_escape(data.get("val_source", "?"))),
                 ("classes", str(len(classes))),
                 ("files left out (unreadable)", str(data.get("skipped", 0)))]
    lines = [f"# Fine-tuning run {md_escape(run_dir.name)}", "",
             f"{md_escape(card.name)} fine-tuned on {len(classes)} classes with featx (LP-FT). "
             "`backbone/` is the exported ONNX backbone, `head.featx` its head and "
             "`classifier.onnx` the whole network; `metrics.csv` and `curve.png` the epochs.", "",
             *_backbone_section(None, card)]
    if backbone is not None:
        lines += ["The fine-tuned backbone (`backbone/`):", "",
                  *_table([("name", md_escape(backbone.name)), ("fingerprint", f"`{backbone.fingerprint}`")])]
    lines += ["## Data", "", *_table(data_rows), *_class_table(counts, ("train", "validation")),
              "## Training", "", *_table(_config_rows(config), ("option", "value")),
              "## Metrics", "", *_table(_run_metric_rows(summary, history), ("metric", "value")),
              *_test_section(None), *_made(command, "Started")]
    for c in resumed_with:
        lines += ["Resumed by:", "", *_code_block(c)]
    return "\n".join(lines)


def write_run_card(run_dir: str | os.PathLike, card: BackboneCard, config: Mapping[str, Any], **kw
                   ) -> Path:
    """Write ``RUN_DIR/README.md`` (atomically); returns its path. See ``render_run_card``."""
    return write_text(Path(run_dir) / RUN_CARD, render_run_card(run_dir, card, config, **kw))
