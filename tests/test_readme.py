"""The README's "Using it" block, run top to bottom, and the other documented commands.

The commands and Python snippets are read from README.md itself, so the page cannot
drift from what featx does. Lines that need a cluster or minutes of torch training are
skipped by name (``SKIPPED``, each with its reason and the test that covers it); every
other line runs, in a fresh folder holding ``data/train`` and ``data/test`` of real photos.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .helpers import make_image_folder, needs_fashion_mnist, photos

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# The lines of the block not run here: prefix -> why (and what covers it instead)
SKIPPED = {
    "featx finetune data/train": "fine-tunes with torch for minutes on CPU "
                                 "(tests/test_finetune_cli.py runs a tiny fine-tune)",
    "featx compare": "trains frozen, LP-FT and from-scratch models per size with torch "
                     "(tests/test_finetune_cli.py::test_compare_cli_writes_table_and_curve)",
    "featx finetune --resume": "needs the fine-tuning run above "
                               "(tests/test_finetune_cli.py::test_sigkill_mid_training_then_resume)",
    "featx export efficientnet_lite0 --quantize int8": "calibrates on hundreds of images and guards "
                                                       "on Fashion-MNIST (tests/test_quantize.py)",
    "featx export efficientnet_lite0 --precision fp16": "a float16 export for GPUs, another torch "
                                                        "export (tests/test_export.py::test_fp16_*)",
    "featx extract /shared/data --engine ray": "needs a Ray cluster and /shared/data "
                                              "(tests/test_ray.py runs the engine on a local one)",
}


def section(text: str, title: str) -> str:
    """The text of the level-2 section ``## title`` (up to the next level-2 heading)."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def featx_lines(block: str) -> list[list[str]]:
    """The ``featx ...`` command lines of a shell block, as argument lists (comments dropped)."""
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.startswith("featx ")]


def skip_reason(args: list[str]) -> str | None:
    line = " ".join(args)
    return next((why for prefix, why in SKIPPED.items() if line.startswith(prefix)), None)


def run_featx(args: list[str], cwd: Path, env: dict | None = None,
              python: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(python or [sys.executable, "-m", "featx.cli"]), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)


def make_project(folder: Path) -> Path:
    """``folder/data/{train,test}/<class>/...``: real photos split 5/3 a class, and new_images/."""
    make_image_folder(folder / "all", per_class=8)
    for cls in ("cat", "thing"):
        files = sorted((folder / "all" / cls).iterdir())
        for split, part in (("train", files[:5]), ("test", files[5:])):
            (folder / "data" / split / cls).mkdir(parents=True)
            for f in part:
                shutil.move(str(f), folder / "data" / split / cls / f.name)
    shutil.rmtree(folder / "all")
    (folder / "new_images").mkdir()
    for name in ("chelsea", "rocket"):
        Image.fromarray(photos()[name]).save(folder / "new_images" / f"{name}.jpg")
    return folder


@pytest.fixture(scope="module")
def readme_run(lite0, tmp_path_factory):
    """Run every featx line of the README block in a fresh project folder; returns (folder, outputs)."""
    folder = make_project(tmp_path_factory.mktemp("readme") / "project")
    block = code_blocks(section(README.read_text(), "Using it"), "bash")[0]
    outputs = {}
    for args in featx_lines(block):
        if skip_reason(args):
            continue
        r = run_featx(args[1:], folder)
        assert r.returncode == 0, f"$ {shlex.join(args)}\n{r.stdout}\n{r.stderr}"
        outputs[shlex.join(args)] = r.stdout
    return folder, outputs


def test_every_line_of_the_block_runs_or_is_skipped_by_name(readme_run):
    block = code_blocks(section(README.read_text(), "Using it"), "bash")[0]
    lines = [" ".join(a) for a in featx_lines(block)]
    assert len(lines) >= 10
    for prefix in SKIPPED:  # the skip list names lines that exist, nothing else
        assert any(line.startswith(prefix) for line in lines), f"SKIPPED names no line: {prefix}"
    ran = [line for line in lines if not skip_reason(line.split())]
    assert len(ran) == len(readme_run[1]) == len(lines) - len(SKIPPED)


def test_the_block_writes_what_its_comments_say(readme_run):
    folder, outputs = readme_run
    assert (folder / "train.featx.parquet").is_file()
    assert sorted(p.name for p in folder.glob("*.featx.parquet")) == ["train.featx.parquet"]
    fit = next(v for k, v in outputs.items() if k.startswith("featx fit-head"))
    assert "2 classes" in fit
    report = json.loads((folder / "head.featx.report.json").read_text())
    assert report["classes"] == ["cat", "thing"]  # not a train-vs-test classifier
    assert (folder / "head.featx").is_file()
    rows = (folder / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("path,predicted,probability") and rows[0].endswith(",label") and len(rows) == 3
    metrics = json.loads((folder / "test.eval" / "metrics.json").read_text())  # ./test.eval/
    assert metrics["n"] == 6 and metrics["accuracy"] >= 0.5
    assert (folder / "test.eval" / "confusion_matrix.png").is_file()
    assert (folder / "classifier.onnx").is_file()
    spelled_out = next(v for k, v in outputs.items() if k.startswith("featx extract data/train --backbone"))
    assert "10 images: 0 embedded, 10 from cache" in spelled_out


def test_the_python_snippets_run(readme_run, monkeypatch, capsys):
    folder, _ = readme_run
    monkeypatch.chdir(folder)
    blocks = code_blocks(section(README.read_text(), "Using it"), "python")
    assert len(blocks) == 2
    for code in blocks:
        names: dict = {}
        exec(compile(code, str(README), "exec"), names)
    assert "test accuracy" in capsys.readouterr().out
    X, y = names["X"], names["y"]  # the pandas snippet: the table is readable without featx
    # `featx extract` embeds with multi features by default (docs/heads.md, "Which default")
    assert X.shape == (10, 4880) and X.dtype == np.float32 and sorted(set(y)) == ["cat", "thing"]


# ---- which commands need torch: the README's install table, with torch unimportable ----------

# a Python in which torch, torchvision and timm cannot be imported, as without the torch extra
NO_TORCH = ("import sys\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'torchvision', 'timm'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "from featx.cli.main import main\n"
            "main()\n")


def test_frozen_path_runs_without_torch_once_exported(readme_run, tmp_path):
    folder, _ = readme_run
    python = [sys.executable, "-c", NO_TORCH]
    out = tmp_path / "nt"
    for args in (["models"],
                 ["extract", "data/test", "--out", str(out / "test.featx.parquet"), "-q"],
                 ["fit-head", "--embeddings", "train.featx.parquet", "--C", "1.0",
                  "--out", str(out / "head.featx")],
                 ["predict", str(out / "head.featx"), "new_images/", "-q"],
                 ["evaluate", str(out / "head.featx"), "data/test", "--out-dir", str(out / "eval"), "-q"],
                 ["export-classifier", str(out / "head.featx"), "--out", str(out / "c.onnx")]):
        r = run_featx(args, folder, python=python)
        assert r.returncode == 0, f"featx {shlex.join(args)} without torch:\n{r.stdout}\n{r.stderr}"
    # the first use of a card exports it from PyTorch: that, and only that, needs the extra
    env = {**os.environ, "FEATX_HOME": str(tmp_path / "empty-home")}
    r = run_featx(["extract", "data/train", "--out", str(out / "t.parquet"), "-q"], folder, env=env,
                  python=python)
    assert r.returncode == 1
    assert "torch is needed for this; install featx's 'torch' extra: pip install '.[torch]'" in r.stderr


def test_install_section_names_the_cpu_wheel_index_and_no_pypi_install():
    text = section(README.read_text(), "Installing")
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in text
    assert 'pip install ".[cpu,torch]"' in text
    assert 'pip install "featx[cpu]"' not in README.read_text()  # featx is not on PyPI
    # scripts/setup.sh offers the same CPU-only route
    assert "FEATX_TORCH_INDEX" in (ROOT / "scripts" / "setup.sh").read_text()


# ---- examples/fashion_mnist.py: a quick look embeds only what it uses --------------------------

@needs_fashion_mnist
def test_fashion_mnist_example_extracts_only_what_the_sizes_need(lite0, tmp_path):
    out = tmp_path / "fm"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "fashion_mnist.py"), "--sizes", "3,5",
                        "--test-per-class", "2", "--cv", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["train_images_embedded"] == 50 and doc["test_images"] == 20
    assert [row["n_train"] for row in doc["results"]] == [30, 50]
    assert not (out / "train").exists() and not (out / "test").exists()
    assert len(list((out / "train-5-a-class").rglob("*.png"))) == 50
    assert all(0.0 <= row["featx"]["test_accuracy"] <= 1.0 for row in doc["results"])


# ---- docs/api.md lists exactly the public names --------------------------------------------------

API_PACKAGES = ("featx", "featx.backbones", "featx.embed", "featx.engines", "featx.heads", "featx.finetune")


def test_api_page_lists_every_public_name():
    import importlib

    text = (ROOT / "docs" / "api.md").read_text()
    for pkg in API_PACKAGES:
        body = text.split(f"\n## `{pkg}`\n", 1)[1].split("\n## ", 1)[0]
        listed = re.findall(r"^\| `([A-Za-z_][A-Za-z0-9_]*)` \|", body, flags=re.M)
        public = importlib.import_module(pkg).__all__
        assert sorted(listed) == sorted(public), (pkg, set(listed) ^ set(public))
        for name in public:  # and every one of them is really there
            assert name == "__version__" or getattr(importlib.import_module(pkg), name) is not None
