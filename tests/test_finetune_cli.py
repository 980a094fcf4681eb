"""`featx finetune` and `featx compare` through click, on real photos with real weights (tiny runs)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from featx.cli import main
from featx.errors import FeatXError

from .helpers import make_image_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("cli") / "data")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_finetune_then_extract_and_predict_with_the_run(data, tmp_path):
    run = tmp_path / "ft1"
    r = invoke("finetune", data, "--out", run, "--epochs", 1, "--input-size", 64, "--batch-size", 4,
               "--unfreeze", 1, "--val-fraction", 0.25, "--device", "cpu", "--features", "last", "--erase", 0.25,
               "--json")
    assert r.exit_code == 0, r.output
    assert json.loads((run / "config.json").read_text())["config"]["erase"] == 0.25
    s = json.loads(r.stdout)
    assert s["epochs_trained"] == 1 and s["val_images"] == 2 and s["classes"] == ["cat", "thing"]
    assert "epoch 1: train loss" in r.stderr  # per-epoch line with loss, accuracy, img/s
    assert (run / "curve.png").is_file() and (run / "metrics.csv").read_text().startswith("epoch,")

    r = invoke("extract", data, "--backbone", run, "--out", tmp_path / "t.parquet", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["fingerprint"] == s["fingerprint"]

    r = invoke("predict", run, data, "--json")
    assert r.exit_code == 0, r.output
    preds = json.loads(r.stdout)["predictions"]
    assert len(preds) == 8
    # the fine-tuned classifier still separates cats from things
    assert sum(p["top"][0]["class"] == p["path"].split("/")[-2] for p in preds) >= 7

    r = invoke("finetune", "--resume", run)
    assert r.exit_code == 1 and "already finished" in r.output


def test_a_recipe_fills_the_options_not_given_and_says_so(data, tmp_path):
    from featx.finetune import finetune
    from featx.recipes import RECIPES

    run = tmp_path / "rc"
    r = invoke("finetune", data, "--out", run, "--recipe", "small-images", "--epochs", 1, "--batch-size", 4,
               "--lp-C", 1, "--val-fraction", 0.25, "--device", "cpu")
    assert r.exit_code == 0, r.output
    config = json.loads((run / "config.json").read_text())["config"]
    recipe = RECIPES["small-images"]
    assert config["recipe"] == "small-images" and config["batch_size"] == 4  # given on the command line: wins
    assert {k: config[k] for k in recipe if k != "batch_size"} == {k: v for k, v in recipe.items() if k != "batch_size"}
    said = next(line for line in r.stderr.splitlines() if line.startswith("recipe small-images:"))
    assert "--unfreeze 6" in said and "--input-size 80" in said and "--batch-size" not in said
    r = invoke("finetune", "--resume", run, "--recipe", "small-images")
    assert r.exit_code == 2 and "--recipe cannot" in r.output
    r = invoke("finetune", data, "--recipe", "huge-images")
    assert r.exit_code == 2 and "small-images" in r.output
    # the Python API: the recipe first, keyword options over it
    api = finetune(data, out=tmp_path / "api", recipe="small-images", epochs=1, batch_size=4, lp_C=1.0,
                   unfreeze=1, val_fraction=0.25, device="cpu")
    config = json.loads((api.run_dir / "config.json").read_text())["config"]
    assert (config["unfreeze"], config["batch_size"], config["erase"], config["input_size"]) == (1, 4, 0.25, 80)
    with pytest.raises(FeatXError, match="unknown recipe 'huge'"):
        finetune(data, out=tmp_path / "no", recipe="huge", device="cpu")


def test_finetune_usage_errors(data, tmp_path):
    r = invoke("finetune")
    assert r.exit_code == 2 and "--resume" in r.output
    r = invoke("finetune", data, "--unfreeze", "most")
    assert r.exit_code == 2 and "neither a number of blocks nor 'all'" in r.output
    r = invoke("finetune", data, "--lp-C", "big")
    assert r.exit_code == 2 and "neither 'auto' nor a number" in r.output
    r = invoke("finetune", data, "--backbone", tmp_path, "--out", tmp_path / "z")
    assert r.exit_code == 1 and "starts from a backbone card" in r.output
    r = invoke("finetune", data, "--unfreeze", 99, "--out", tmp_path / "x")
    assert r.exit_code == 1 and "unfreezable blocks" in r.output
    if not torch.cuda.is_available():
        r = invoke("finetune", data, "--device", "cuda", "--out", tmp_path / "y")
        # the reason names the build: CPU-only, or a CUDA build that sees no GPU
        expected = "sees no GPU" if torch.version.cuda else "CPU-only build"
        assert r.exit_code == 1 and expected in r.output and "--device cpu" in r.output


def test_compare_cli_writes_table_and_curve(data, tmp_path):
    test = make_image_folder(tmp_path / "test", per_class=2)
    out = tmp_path / "report"
    r = invoke("compare", data, "--test", test, "--per-class", "2,all", "--methods", "frozen,lpft",
               "--epochs", 1, "--input-size", 64, "--batch-size", 4, "--unfreeze", 1,
               "--backbone-lr", 3e-4, "--crop-scale", 0.5, "--device", "cpu", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    config = json.loads(r.stdout)["config"]
    assert (config["backbone_lr"], config["crop_scale"]) == (3e-4, 0.5)
    rows = json.loads(r.stdout)["rows"]
    assert [(x["per_class"], x["method"]) for x in rows] == [
        (2, "frozen"), (2, "lpft"), ("all", "frozen"), ("all", "lpft")]
    assert [x["train_images"] for x in rows] == [4, 4, 8, 8]
    frozen = [x for x in rows if x["method"] == "frozen"]
    # cats vs coffee/rocket on 4 test photos, even at 64 px: a working probe beats chance (0.5)
    assert all(x["accuracy"] >= 0.75 for x in frozen)
    assert all(x["embed_seconds"] > 0 for x in frozen)  # priced even when the embeddings are cached
    assert all(0 <= x["accuracy"] <= 1 and x["seconds"] > 0 for x in rows)
    # the whole compare: runs done of all, elapsed and the time left, a line after every run
    lines = [x for x in r.stderr.splitlines() if x.startswith("compare: ")]
    assert lines[0].startswith("compare: 0 of 4 runs done, ") and lines[0].endswith("time left unknown until a run is timed")
    assert [x.split(" runs done")[0] for x in lines] == [f"compare: {k} of 4" for k in range(5)]
    assert lines[2].endswith(" left") and "about" in lines[2] and lines[-1].endswith("about 0 s left")
    md = (out / "compare.md").read_text()
    assert "| 2 | 4 |" in md and "LP-FT" in md
    assert (out / "learning_curve.png").stat().st_size > 10_000
    r = invoke("compare", data, "--per-class", "0")
    assert r.exit_code == 1 and "must be >= 1" in r.output


def test_sigkill_mid_training_then_resume(data, tmp_path, featx_home):
    """A real `featx finetune` killed with SIGKILL after an epoch resumes from that epoch."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "killed"
    env = {**os.environ, "FEATX_HOME": str(featx_home)}
    base = [sys.executable, "-m", "featx.cli", "finetune"]
    args = [str(data), "--out", str(run), "--epochs", "6", "--input-size", "64", "--batch-size", "4",
            "--unfreeze", "1", "--lp-C", "1.0", "--patience", "100", "--val-fraction", "0.25",
            "--device", "cpu", "-q"]
    proc = subprocess.Popen(base + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    status = run / "status.json"

    def epoch() -> int:
        try:
            return json.loads(status.read_text()).get("epoch") or 0
        except (OSError, ValueError):
            return 0

    while time.time() < deadline and epoch() < 1 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = epoch()
    assert 1 <= killed_at < 6, f"killed at epoch {killed_at}: the test proves nothing"
    first = json.loads((run / "metrics.json").read_text())  # a list of epoch rows
    done = subprocess.run([*base, "--resume", str(run), "--json", "-q"], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    rows = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == list(range(1, 7))  # every epoch exactly once
    # the epochs finished before the kill were not trained again
    for a, b in zip(first[:killed_at], rows[:killed_at], strict=True):
        assert a["train_loss"] == b["train_loss"]
    assert json.loads(status.read_text())["state"] == "done"
    assert (run / "backbone" / "model.onnx").is_file() and (run / "head.featx").is_file()


def test_workers_is_a_deprecated_name_for_loader_workers(tmp_path):
    bad = tmp_path / "bad"
    for c in ("a", "b"):
        (bad / c).mkdir(parents=True)
        (bad / c / "x.jpg").write_bytes(b"")
    r = CliRunner().invoke(main, ["finetune", str(bad), "--workers", "2", "--out", str(tmp_path / "r"),
                                  "--device", "cpu"])
    assert "--workers is deprecated for finetune" in r.stderr and "use --loader-workers" in r.stderr
    assert r.exit_code == 1 and "no usable training image" in r.stderr  # the run itself went on to its checks
    r = CliRunner().invoke(main, ["finetune", str(bad), "--loader-workers", "2", "--out", str(tmp_path / "r"),
                                  "--device", "cpu"])
    assert r.exit_code == 1 and "--workers is deprecated" not in r.stderr
    r = CliRunner().invoke(main, ["finetune", str(bad), "--root", str(bad)])
    assert r.exit_code == 2 and "--root finds the data of a run that moved" in r.output


def test_time_budget_takes_durations_and_refuses_nonsense(data, tmp_path):
    from featx.cli.finetune import DurationParam

    d = DurationParam()
    assert [d.convert(v, None, None) for v in ("600", "90s", "30m", "1.5h")] == [600, 90, 1800, 5400]
    for bad in ("soon", "-5m", "0"):
        r = CliRunner().invoke(main, ["finetune", str(data), "--time-budget", bad, "--out", str(tmp_path / "x")])
        assert r.exit_code == 2 and "--time-budget" in r.output, r.output
        assert not (tmp_path / "x").exists()
