"""Model cards beside heads and in fine-tuning runs; `featx models` with licence, params, top-1.

Real photos (tests/helpers.make_image_folder), the real default backbone, real
`featx` processes for the command line a card records.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from featx.backbones.cards import get_card
from featx.cli import main
from featx.heads.headfile import peek_header
from featx.modelcard import TEST_BEGIN, TEST_END, head_card_path, md_escape

from .helpers import make_image_folder

ODD = "tabby | cat"  # a class name with a table separator in it


def featx(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "featx.cli", *args], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, f"featx {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r


def cells(line: str) -> list[str]:
    """The cells of a markdown table row, split on unescaped pipes, unescaped."""
    parts = re.split(r"(?<!\\)\|", line.strip())
    assert parts[0] == "" and parts[-1] == "", line
    return [re.sub(r"\\(.)", r"\1", p.strip()) for p in parts[1:-1]]


def section(text: str, title: str) -> list[str]:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0].splitlines()


def table_rows(text: str, title: str) -> dict[str, list[str]]:
    """Rows of every table in a section, keyed by their first cell."""
    rows = [cells(line) for line in section(text, title) if line.startswith("|") and "---" not in line]
    return {r[0]: r[1:] for r in rows}


@pytest.fixture(scope="module")
def fitted(lite0, tmp_path_factory):
    """`featx extract` + `featx fit-head` run as a user would, on classes one of which has a `|`."""
    work = tmp_path_factory.mktemp("cards")
    train = make_image_folder(work / "data" / "train", per_class=4)
    (train / "cat").rename(train / ODD)
    featx("extract", "data/train", "-q", cwd=work)
    featx("fit-head", "--cv", "2", "--out", "heads/h1.joblib", cwd=work)
    head = work / "heads" / "h1.joblib"
    return work, head, head_card_path(head).read_text(encoding="utf-8")


def test_fit_head_writes_a_card_beside_the_head(fitted, lite0):
    from featx.backbones.resolve import resolve_backbone

    work, head, text = fitted
    assert head_card_path(head) == work / "heads" / "h1.README.md"
    bb = table_rows(text, "Backbone")
    # `featx extract` embeds with the card's multi features by default
    multi = resolve_backbone("efficientnet_lite0", features="multi")
    assert bb["name"] == [multi.name] == ["efficientnet_lite0-multi"] and bb["licence"] == ["Apache-2.0"]
    assert bb["fingerprint"] == [f"`{multi.fingerprint}`"]
    assert "4.7M parameters" in bb["published"][0] and "74.83%" in bb["published"][0]
    assert "centre 224x224" in bb["preprocessing"][0] and "bicubic" in bb["preprocessing"][0]


def test_the_card_holds_the_heads_recorded_metrics(fitted):
    work, head, text = fitted
    rep = peek_header(head)["train"]  # what the head file itself records
    assert rep["C_auto"] and rep["class_counts"] == {ODD: 4, "thing": 4}
    h = table_rows(text, "Head")
    assert h["kind"] == ["logreg"] and h["C"][0].startswith(f"{rep['C']:g}, chosen by stratified 2-fold CV")
    m = table_rows(text, "Metrics")
    assert m["CV accuracy (2-fold, at the chosen C)"] == \
        [f"{rep['cv_score_mean']:.4f} ± {rep['cv_score_std']:.4f}"]
    assert m["training accuracy"] == [f"{rep['train_accuracy']:.4f}"]
    d = table_rows(text, "Data")
    assert d["embeddings table"] == [str(work / "train.featx.parquet")]
    assert d["images"] == [str(work / "data" / "train")] and d["split"] == ["train"] and d["rows"] == ["8"]


def test_a_class_name_with_a_pipe_does_not_break_the_table(fitted):
    _, _, text = fitted
    lines = section(text, "Data")
    start = lines.index("| class | images |")
    rows = [cells(line) for line in lines[start + 2:] if line.startswith("|")]
    assert rows == [[ODD, "4"], ["thing", "4"]]  # two cells each: the | stayed inside its cell
    assert md_escape("a|b\nc") == r"a\|b c"


def test_the_card_records_the_command_that_made_it(fitted):
    work, _, text = fitted
    made = section(text, "How it was made")
    assert f"Fitted by this command, run in {md_escape(work)}:" in made
    block = made[made.index("```") + 1]
    assert block == "featx fit-head --cv 2 --out heads/h1.joblib"


def test_evaluate_records_test_metrics_in_the_card(fitted):
    work, head, _ = fitted
    test = make_image_folder(work / "data" / "test", per_class=2)
    (test / "cat").rename(test / ODD)
    for _ in range(2):  # a second evaluation of the same set replaces the first
        featx("evaluate", str(head), "data/test", "--out-dir", "ev", "--force", "-q", cwd=work)
    text = head_card_path(head).read_text(encoding="utf-8")
    assert text.count(TEST_BEGIN) == text.count(TEST_END) == text.count("## Evaluations") == 1
    assert text.count(f"### {md_escape(work / 'data' / 'test')}") == 1
    metrics = json.loads((work / "ev" / "metrics.json").read_text())
    t = table_rows(text, "Evaluations")
    assert t["accuracy"][0] == f"{metrics['accuracy']:.4f}" and t["images"][0] == "4"
    # make_image_folder draws the same crops for the first two test images as for train's
    assert "**Not a held-out test set**: 2 of its 4 images are training rows" in text
    assert table_rows(text, "Backbone")["licence"] == ["Apache-2.0"]  # the rest is untouched


def test_models_lists_licence_params_and_top1():
    rows = {r["name"]: r for r in json.loads(CliRunner().invoke(main, ["models", "--json"]).stdout)}
    lite0 = rows["efficientnet_lite0"]
    assert (lite0["license"], lite0["params"], lite0["imagenet_top1"]) == ("Apache-2.0", 4652008, 74.83)
    assert lite0["published_source"].startswith("https://github.com/huggingface/pytorch-image-models")
    assert rows["resnet50"]["params"] == 25557032 and rows["resnet50"]["imagenet_top1"] == 80.858
    out = CliRunner().invoke(main, ["models", "efficientnet_lite*"]).output.splitlines()
    assert out[0].split()[:7] == ["name", "dim", "input", "params", "top-1", "licence", "weights"]
    line = next(x for x in out if x.startswith("efficientnet_lite0 "))
    assert line.split()[:6] == ["efficientnet_lite0", "1280", "224", "4.7M", "74.8", "Apache-2.0"]


def test_lite0_params_match_the_exported_onnx(lite0):
    """`params` is the published model, classifier included; the export drops the classifier
    (1280 x 1000 + 1000) and folds each BatchNorm's scale and shift into its convolution (one
    value per channel instead of two: 21,008 channels in Lite0), so the ONNX file's float
    initializers are the published count less those, within 1%."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(lite0.onnx_path))
    floats = sum(a.size for a in map(numpy_helper.to_array, model.graph.initializer) if a.dtype.kind == "f")
    card = get_card("efficientnet_lite0")
    headless = card.published.params - (card.dim * 1000 + 1000)
    assert abs(floats - headless) / headless < 0.01, (floats, headless)
    assert abs(floats - card.published.params) / floats > 0.2  # the classifier is not in the file


def test_a_finetuning_run_has_a_card_with_its_final_metrics(tmp_path):
    torch = pytest.importorskip("torch")  # noqa: F841
    from featx.evaluate import evaluate
    from featx.finetune import finetune

    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "runs" / "ft1"
    seen = []

    def on_epoch(row):  # while training, the card says so
        seen.append(table_rows((out / "README.md").read_text(encoding="utf-8"), "Metrics")["state"][0])

    r = finetune(data, out=out, device="cpu", input_size=64, batch_size=4, epochs=2, unfreeze=1, lp_C=1.0,
                 val_fraction=0.5, on_epoch=on_epoch, command="featx finetune data --epochs 2")
    assert len(seen) == 2 and all(s.startswith("training") for s in seen)
    text = (out / "README.md").read_text(encoding="utf-8")
    s = r.summary
    m = table_rows(text, "Metrics")
    assert m["state"][0].startswith("done") and m["epochs trained"] == ["2 of 2"]
    assert m["best epoch"] == [str(s.best_epoch)]
    assert m["validation accuracy (best epoch)"] == [f"{s.best_val_acc:.4f}"]
    bb = table_rows(text, "Backbone")
    assert bb["licence"] == ["Apache-2.0"] and bb["fingerprint"] == [f"`{r.backbone.fingerprint}`"]
    d = table_rows(text, "Data")
    train_n, val_n = (int(v) for v in d["cat"])
    assert train_n + val_n == 4 and s.train_images + s.val_images == 8
    assert table_rows(text, "Training")["epochs"] == ["2"]
    assert "featx finetune data --epochs 2" in section(text, "How it was made")
    ev = evaluate(out, data, out_dir=tmp_path / "ev")  # the run's head: its card is the run's README
    text = (out / "README.md").read_text(encoding="utf-8")
    # the run's head records its training images, so its own folder is no test: the card says so and
    # adds the images disjoint from training (the validation half) as a second column
    assert ev.metrics["overlap"]["exact"] == s.train_images and ev.metrics["disjoint"]["n"] == s.val_images
    assert table_rows(text, "Evaluations")["accuracy"] == [f"{ev.metrics['accuracy']:.4f}",
                                                           f"{ev.metrics['disjoint']['accuracy']:.4f}"]
    assert "**Not a held-out test set**" in text


def test_a_resumed_runs_card_keeps_the_command_that_started_it(tmp_path):
    pytest.importorskip("torch")
    from featx.finetune import finetune

    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "ft"
    opts = {"input_size": 64, "batch_size": 4, "unfreeze": 1, "lp_C": 1.0, "val_fraction": 0.5}
    finetune(data, out=out, device="cpu", epochs=1, command="featx finetune data --epochs 1", **opts)
    assert json.loads((out / "config.json").read_text())["command"] == "featx finetune data --epochs 1"
    finetune(resume=out, device="cpu", epochs=2, command=f"featx finetune --resume {out} --epochs 2")
    text = (out / "README.md").read_text(encoding="utf-8")
    made = "\n".join(section(text, "How it was made"))
    assert made.index("featx finetune data --epochs 1") < made.index("Resumed by:") < \
        made.index(f"featx finetune --resume {out} --epochs 2")
    assert table_rows(text, "Metrics")["epochs trained"] == ["2 of 2"]
