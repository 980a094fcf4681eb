"""End to end on real images: extract -> fit-head -> predict -> evaluate, via the CLI."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featx.backbones.artifact import fingerprint_of, load_export
from featx.backbones.cards import Preprocess
from featx.cli import main
from featx.embed.store import EmbeddingStore
from featx.heads.headfile import load_head, save_head

from .helpers import fashion_mnist_folder, needs_fashion_mnist
from .helpers import run_cli as run

pytestmark = needs_fashion_mnist

@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """extract + fit-head once for the module; returns the paths."""
    d = tmp_path_factory.mktemp("flow")
    train = fashion_mnist_folder(d / "train", "train", 10)
    test = fashion_mnist_folder(d / "test", "test", 5)
    (test / "bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    # last features: the tests below count rows in the `lite0` fixture's store (extract's default is multi)
    r = CliRunner().invoke(main, ["extract", str(train), "--features", "last", "--out", str(d / "train.parquet"),
                                  "-q"])
    assert r.exit_code == 0, r.output
    return {"dir": d, "train": train, "test": test, "table": d / "train.parquet"}


@pytest.fixture(scope="module")
def head(flow):
    out = flow["dir"] / "head.featx"
    r = run("fit-head", "--embeddings", str(flow["table"]), "--C", "auto", "--cv", "3",
            "--out", str(out))
    assert "C = " in r.output and "auto: 3-fold CV" in r.output
    return out


def test_fit_head_writes_head_and_report(flow, head):
    rep = json.loads(head.with_name("head.featx.report.json").read_text())
    assert rep["classes"] == ["bag", "t-shirt", "trouser"]
    assert rep["n_train"] == 30 and rep["C_auto"] and rep["cv_score_std"] >= 0
    h = load_head(head)
    assert h.classes == rep["classes"]
    assert h.meta["train"]["embeddings"] == str(flow["table"].resolve())


def test_fit_head_defaults_to_the_table_in_this_folder(flow, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("extract", str(flow["train"]), "--features", "last", "--out", str(tmp_path / "t.featx.parquet"), "-q")
    assert "30 from cache" in r.output  # fitting and re-extracting never re-run the backbone
    r = run("fit-head", "--C", "1", "--json")
    s = json.loads(r.output)
    assert s["embeddings"] == str((tmp_path / "t.featx.parquet").resolve())
    assert Path(s["head_file"]) == Path("head.featx") and (tmp_path / "head.featx").is_file()
    r = run("fit-head", "--embeddings", str(tmp_path / "t.featx.parquet"), "--C", "-1", ok=False)
    assert r.exit_code == 2 and "must be > 0" in r.output


def test_predict_csv_json_and_bad_files(flow, head, lite0):
    out = flow["dir"] / "pred.csv"
    store = EmbeddingStore(lite0)
    before = len(store.keys())
    r = run("predict", str(head), str(flow["test"]), "--out", str(out), "--top-k", "2")
    assert "15 images predicted, 1 failed" in r.output and "broken.png" in r.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 16
    bad = [row for row in rows if row["path"].endswith("broken.png")]
    err = bad[0]["error"]
    assert bad[0]["label"] == "" and ("corrupt" in err or "not an image" in err)
    good = [row for row in rows if not row["error"]]
    truth = [Path(row["path"]).parent.name for row in good]
    acc = np.mean([row["label"] == t for row, t in zip(good, truth, strict=True)])
    assert acc >= 0.8
    for row in good:
        assert row["label"] == row["top1_class"]
        assert float(row["top1_probability"]) >= float(row["top2_probability"])
    # json, and a second run over the same images is served from the cache (other test
    # modules of the session may have embedded some of these images already)
    after = len(EmbeddingStore(lite0).keys())
    assert 0 <= after - before <= 15
    r = run("predict", str(head), str(flow["test"] / "bag"), "--json")
    s = json.loads(r.output)
    assert s["images"] == 5 and s["failed"] == 1
    for p in s["predictions"]:
        assert sum(t["probability"] for t in p["top"]) == pytest.approx(1.0, abs=1e-6)
    assert len(EmbeddingStore(lite0).keys()) == after
    # a folder's stat record (as extract keeps) lets the next run skip re-reading its files
    from featx.embed.statcache import StatCache

    rec = StatCache(store.root, flow["test"]).entries
    assert len(rec) == 15 and not any(p.endswith("broken.png") for p in rec)


def test_evaluate_writes_metrics_and_confusion_png(flow, head, tmp_path):
    r = run("evaluate", str(head), str(flow["test"]), "--out-dir", str(tmp_path / "ev"))
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n"] == 15 and m["failed"] == 1 and m["accuracy"] >= 0.8
    assert set(m["per_class"]) == {"bag", "t-shirt", "trouser"}
    assert sum(map(sum, m["confusion_matrix"])) == 15
    assert np.trace(np.array(m["confusion_matrix"])) == round(m["accuracy"] * 15)
    png = tmp_path / "ev" / "confusion_matrix.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"accuracy {m['accuracy']:.4f}" in r.output and str(png) in r.output


def test_head_on_another_backbone_is_refused(flow, head, lite0, tmp_path):
    # a real second backbone: the same graph exported with other preprocessing
    other = tmp_path / "other"
    shutil.copytree(lite0.onnx_path.parent, other)
    meta = json.loads((other / "model.json").read_text())
    meta["preprocess"]["interpolation"] = "bilinear"
    pre = Preprocess.from_dict(meta["preprocess"])
    meta["fingerprint"] = fingerprint_of((other / "model.onnx").read_bytes(), pre)
    (other / "model.json").write_text(json.dumps(meta))
    assert load_export(other).fingerprint != lite0.fingerprint
    for cmd in (["predict", str(head), str(flow["test"])],
                ["evaluate", str(head), str(flow["test"])],
                ["export-classifier", str(head), "--out", str(tmp_path / "c.onnx")]):
        r = run(*cmd, "--backbone", str(other), ok=False)
        assert r.exit_code == 1
        assert "was trained on backbone" in r.output and lite0.fingerprint in r.output


def test_tampered_head_is_refused_by_the_cli(flow, head, tmp_path):
    bad = tmp_path / "bad.joblib"
    data = bytearray(head.read_bytes())
    data[-5] ^= 1
    bad.write_bytes(bytes(data))
    r = run("predict", str(bad), str(flow["test"]), ok=False)
    assert r.exit_code == 1 and "integrity check failed" in r.output


def test_run_directory_with_its_own_backbone(flow, head, lite0, tmp_path):
    """The fine-tuning layout: run/backbone/ (an export) + run/head.featx; the run can move."""
    run_dir = tmp_path / "runs" / "ft1"
    shutil.copytree(lite0.onnx_path.parent, run_dir / "backbone")
    h = load_head(head)
    save_head(run_dir / "head.featx", h.pipeline, h.classes, load_export(run_dir / "backbone"),
              {"source": "test"})
    moved = tmp_path / "elsewhere"
    shutil.move(str(run_dir), moved)
    assert load_head(moved).backbone_dir == str((moved / "backbone").resolve())
    r = run("predict", str(moved), str(flow["test"] / "trouser"), "--json")
    assert [p["label"] for p in json.loads(r.output)["predictions"]].count("trouser") >= 4


def test_cli_through_a_real_subprocess(flow, head, tmp_path):
    out = tmp_path / "p.json"
    proc = subprocess.run([sys.executable, "-m", "featx.cli", "predict", str(head),
                           str(flow["test"] / "t-shirt"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["classes"] == ["bag", "t-shirt", "trouser"] and len(doc["predictions"]) == 5
    proc = subprocess.run([sys.executable, "-m", "featx.cli", "predict", str(tmp_path / "p.json"),
                           str(flow["test"])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "not a featx head file" in proc.stderr


def test_quickstart_example_runs_the_whole_flow():
    """README command 1: extract -> fit-head -> evaluate on a real labelled set."""
    import re

    script = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    acc = float(re.search(r"test accuracy ([\d.]+)% on 200 images", proc.stdout).group(1))
    assert acc >= 70  # 20 images a class, 10 classes; chance is 10%
    png = Path(re.search(r"confusion matrix: (\S+)", proc.stdout.splitlines()[-1]).group(1))
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_min_proba_abstains_below_the_threshold(flow, head, tmp_path):
    r = run("predict", str(head), str(flow["test"]), "--json")
    probs = sorted(p["probability"] for p in json.loads(r.output)["predictions"])
    cut = (probs[4] + probs[5]) / 2  # five images below it
    out = tmp_path / "p.csv"
    r = run("predict", str(head), str(flow["test"]), "--min-proba", f"{cut}", "--out", str(out))
    assert f"5 below --min-proba {cut:g} (label left empty)" in r.output
    rows = [row for row in csv.DictReader(out.open()) if not row["error"]]
    low = [row for row in rows if float(row["probability"]) < cut]
    assert len(low) == 5 and all(row["label"] == "" and row["top1_class"] for row in low)
    assert all(row["label"] == row["top1_class"] for row in rows if row not in low)
    r = run("predict", str(head), str(flow["test"]), "--min-proba", f"{cut}", "--json")
    preds = json.loads(r.output)["predictions"]
    assert sum(p["label"] is None and p["abstained"] for p in preds) == 5
    r = run("predict", str(head), str(flow["test"]), "--min-proba", "1.5", ok=False)
    assert r.exit_code == 2


def test_evaluate_reports_calibration(flow, head, tmp_path):
    from featx.evaluate import calibration
    from featx.predict import predict

    run("evaluate", str(head), str(flow["test"]), "--out-dir", str(tmp_path / "ev"))
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    cal = m["calibration"]
    assert sum(b["count"] for b in cal["bins"]) == m["n"] and 0 <= cal["ece"] <= 1
    res = predict(head, [flow["test"]])
    truth = np.array([Path(f).parent.name for f in res.files])
    conf = res.proba.max(1)
    assert cal["ece"] == pytest.approx(calibration(conf, truth == np.array(res.labels))["ece"])
    # by hand: the weighted gap between confidence and accuracy over 15 equal bins
    bins = np.minimum((conf * 15).astype(int) - (conf * 15 == np.floor(conf * 15)), 14).clip(0)
    gap = sum(abs((truth == np.array(res.labels))[bins == b].mean() - conf[bins == b].mean())
              * (bins == b).sum() for b in set(bins.tolist())) / len(conf)
    assert cal["ece"] == pytest.approx(gap)
    png = tmp_path / "ev" / "reliability.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and m["reliability_png"] == str(png)


def test_evaluate_does_not_overwrite_another_heads_results(flow, head, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other.joblib"
    run("fit-head", "--embeddings", str(flow["table"]), "--C", "0.01", "--out", str(other))
    r = run("evaluate", str(head), str(flow["test"]))
    out = Path(f"{flow['test'].name}.eval")
    assert f"wrote {out / 'metrics.json'}" in r.output and f"wrote {out / 'reliability.png'}" in r.output
    first = (out / "metrics.json").read_text()
    r = run("evaluate", str(other), str(flow["test"]), ok=False)
    assert r.exit_code == 1 and "already holds the evaluation of" in r.output and "--force" in r.output
    assert (out / "metrics.json").read_text() == first
    run("evaluate", str(head), str(flow["test"]))  # the same head on the same folder: a refresh
    run("evaluate", str(other), str(flow["test"]), "--force")
    assert json.loads((out / "metrics.json").read_text())["head"] == str(other.resolve())


def test_evaluate_leaks_no_sklearn_warnings(flow, head, tmp_path):
    """A folder with a class the head does not know: sklearn warns, evaluate must not."""
    import warnings

    from featx.evaluate import evaluate

    folder = tmp_path / "mixed"
    shutil.copytree(flow["test"] / "bag", folder / "bag")
    fashion_mnist_folder(tmp_path / "coats", "test", 5)
    shutil.copytree(tmp_path / "coats" / "t-shirt", folder / "coat")  # a class the head lacks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = evaluate(head, folder)
    assert r.metrics["unknown_classes"] == ["coat"]
    assert not [w for w in caught if "sklearn" in w.filename], [str(w.message) for w in caught]


def test_evaluate_error_analysis(flow, head, tmp_path):
    """predictions.csv (worst first), the top-losses grid and an HTML page whose matrix
    cells link to their images; a hostile file name stays text."""
    import html as htmlmod
    import re

    folder = tmp_path / "test"
    shutil.copytree(flow["test"], folder)
    evil = "x'><img src=x onerror=alert(1)>.png"
    shutil.copy(next((folder / "bag").glob("*.png")), folder / "bag" / evil)
    out = tmp_path / "ev"
    run("evaluate", str(head), str(folder), "--out-dir", str(out))
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    m = json.loads((out / "metrics.json").read_text())
    assert len(rows) == m["n"] == 16
    losses = [float(r["loss"]) for r in rows]
    assert losses == sorted(losses, reverse=True)
    for r in rows:
        assert r["true"] == Path(r["path"]).parent.name
        assert float(r["loss"]) == pytest.approx(-np.log(max(float(r["true_probability"]), 1e-15)),
                                                 abs=1e-5)
        assert (r["correct"] == "True") == (r["true"] == r["predicted"])
    assert (out / "top_losses.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "report.html").read_text()
    assert "<img src=x onerror" not in page and htmlmod.escape("<img src=x onerror") in page
    cm = np.array(m["confusion_matrix"])
    links = set(re.findall(r"href=\"#(cell-\d+-\d+)\"", page))
    targets = set(re.findall(r"id='(cell-\d+-\d+)'", page))
    assert links == targets == {f"cell-{i}-{j}" for i, j in zip(*np.nonzero(cm), strict=True)}
    from urllib.parse import unquote

    cells = re.findall(r"<a href='([^']+)' title='[^']*'><img src='([^']+)' loading=lazy></a>", page)
    assert len(cells) == 16 and all((out / unquote(h)).resolve().is_file() for h, _ in cells)
    # the page is self-contained: thumbnails and plots are embedded, so a moved page shows them
    assert all(src.startswith("data:image/jpeg;base64,") for _, src in cells)
    assert "<img src='data:image/png;base64," in page and "src='confusion_matrix.png'" not in page
    per_class = page.split("<h2>Per class</h2>", 1)[1].split("</table>", 1)[0]
    for c, v in m["per_class"].items():
        if v["support"]:
            assert (f"<tr><th>{htmlmod.escape(c)}</th><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td>"
                    f"<td>{v['f1']:.3f}</td><td>{v['support']}</td></tr>") in per_class
    assert f"<td>{m['macro_f1']:.3f}</td>" in per_class and f"macro F1 {m['macro_f1']:.4f}" in page
    norm = cm / cm.sum(1, keepdims=True)
    assert f"{norm[0, 0]:.2f}" in page and "Most confused pairs" in page
    assert m["most_confused"] == sorted(m["most_confused"], key=lambda p: -p["count"])


def test_tta_flip_averages_each_image_with_its_mirror(flow, head, tmp_path):
    from PIL import Image

    from featx.errors import FeatXError
    from featx.predict import predict

    files = sorted(p for p in flow["test"].rglob("*.png") if p.name != "broken.png")[:12]
    mirrored = []
    for i, p in enumerate(files):
        mirrored.append(tmp_path / f"{i}.png")
        Image.open(p).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored[-1])
    plain = predict(head, files).proba
    mirror = predict(head, mirrored).proba
    flip = predict(head, files, tta="flip")
    assert np.abs(plain - mirror).max() > 1e-3  # the mirror images really are other inputs
    np.testing.assert_allclose(flip.proba, (plain + mirror) / 2, atol=5e-3)
    assert flip.labels == [flip.classes[j] for j in flip.proba.argmax(1)]
    with pytest.raises(FeatXError, match="tta must be one of none, flip"):
        predict(head, files, tta="rotate")
    run("evaluate", str(head), str(flow["test"]), "--tta", "flip", "--out-dir", str(tmp_path / "ev"), "-q")
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["tta"] == "flip"
