"""`featx fit-head` as a new user meets it: which table, what is written, progress, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featx.datasets import FASHION_MNIST_CLASSES, fashion_mnist
from featx.embed.table import EmbeddingTable, write_table
from featx.engines.files import embed_arrays
from featx.heads.fit import C_GRIDS, fit_head
from featx.sampling import per_class_subset

from .helpers import fashion_mnist_folder, needs_fashion_mnist
from .helpers import run_cli as run

pytestmark = needs_fashion_mnist

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fit-cli")
    return {"train": fashion_mnist_folder(d / "data" / "train", "train", 10),
            "test": fashion_mnist_folder(d / "data" / "test", "test", 5), "data": d / "data"}


@pytest.fixture(scope="module")
def fm_embeddings(lite0):
    """500 Fashion-MNIST embeddings, 50 of each of the 10 classes."""
    x, y = fashion_mnist("train")
    idx = per_class_subset(y, 50, seed=0)
    return embed_arrays(x[idx], lite0), np.array([FASHION_MNIST_CLASSES[c] for c in y[idx]])


def test_fit_head_reads_the_table_here_not_the_last_extract(data, tmp_path, monkeypatch):
    """extract train in a/, extract test in b/, fit-head in a/: it trains on a/'s train table."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    run("extract", str(data["train"]), "-q")
    monkeypatch.chdir(tmp_path / "b")
    run("extract", str(data["test"]), "-q")
    monkeypatch.chdir(tmp_path / "a")
    r = run("fit-head", "--C", "1")
    table = (tmp_path / "a" / "train.featx.parquet").resolve()
    assert r.output.splitlines()[0] == f"table: {table}"
    assert "on 30 images" in r.output and f"wrote head: {Path('head.featx')}" in r.output
    s = json.loads((tmp_path / "a" / "head.featx.report.json").read_text())
    assert s["embeddings"] == str(table) and s["n_train"] == 30


def test_fit_head_without_one_table_here_says_what_to_do(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("fit-head", ok=False)
    assert r.exit_code == 1
    assert "no embeddings table (*.featx.parquet) in" in r.output and "featx extract" in r.output
    run("extract", str(data["train"]), "-q")
    run("extract", str(data["test"]), "-q")
    r = run("fit-head", ok=False)
    assert r.exit_code == 1
    assert "2 embeddings tables in" in r.output
    assert "test.featx.parquet, train.featx.parquet" in r.output and "--embeddings" in r.output
    assert not (tmp_path / "head.featx").exists()


def test_split_names_as_classes_get_a_warning(data, tmp_path, monkeypatch):
    """The README trap: extracting data/ (train/, test/) trains a train-vs-test classifier."""
    monkeypatch.chdir(tmp_path)
    run("extract", str(data["data"]), "-q")
    r = run("fit-head", "--C", "1")
    want = f"featx extract {data['data'].resolve() / 'train'}"
    assert "warning: the classes of" in r.output and "split names" in r.output and want in r.output
    r = run("fit-head", "--C", "1", "--json")
    assert "split names" in json.loads(r.stdout)["warnings"][0]


def test_fit_head_does_not_overwrite_another_tables_head(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run("extract", str(data["train"]), "--out", "t1.parquet", "-q")
    run("extract", str(data["test"]), "--out", "t2.parquet", "-q")
    run("fit-head", "-e", "t1.parquet", "--C", "1")
    first = Path("head.featx").read_bytes()
    r = run("fit-head", "-e", "t2.parquet", "--C", "1", ok=False)
    assert r.exit_code == 1
    assert f"head.featx already exists and holds a head trained on {(tmp_path / 't1.parquet').resolve()}" \
        in r.output and "--force" in r.output
    assert Path("head.featx").read_bytes() == first
    r = run("fit-head", "-e", "t1.parquet", "--C", "0.5")  # a refit of the same table is normal
    assert "replaced this table's previous head" in r.output
    run("fit-head", "-e", "t2.parquet", "--C", "1", "--force")
    assert json.loads(Path("head.featx.report.json").read_text())["embeddings"].endswith("t2.parquet")
    Path("notes.txt").write_text("mine")
    r = run("fit-head", "-e", "t2.parquet", "--C", "1", "--out", "notes.txt", ok=False)
    assert "not a featx head" in r.output and Path("notes.txt").read_text() == "mine"


@pytest.mark.parametrize("head", ["logreg", "linear-svm", "svm-rbf"])
def test_progress_reports_every_fold_of_every_head(fm_embeddings, head):
    X, y = fm_embeddings
    calls = []
    _, rep = fit_head(X[::2], y[::2], head=head, C="auto", cv=3,
                         progress=lambda *a: calls.append(a))
    total, done = len(C_GRIDS[head]) * 3, len(rep["cv_grid"]) * 3
    assert calls[:done + 1] == [("choose C", i, total) for i in range(done + 1)]
    stopped = [("choose C", done, done)] if done < total else []  # the bar ends where the walk stopped
    assert calls[done + 1:] == [*stopped, ("fit", 0, 1), ("fit", 1, 1)]
    assert [g["C"] for g in rep["cv_grid"]] + rep["cv_skipped"] == list(C_GRIDS[head])


def test_C_search_stops_after_two_values_below_the_best(fm_embeddings):
    """The largest C are the slowest fits; the walk up the grid ends past the peak (logreg:
    the lowest out-of-fold log-loss; the linear SVM: the highest accuracy)."""
    X, y = fm_embeddings
    _, rep = fit_head(X, y, head="logreg", C="auto", cv=3)
    losses = [g["log_loss"] for g in rep["cv_grid"]]
    assert rep["cv_select"] == "log_loss"
    assert rep["cv_skipped"], rep["cv_grid"]  # this probe peaks well inside the grid
    assert rep["cv_skipped"] == list(C_GRIDS["logreg"])[len(losses):]
    best = min(losses[:-2])
    assert all(v > best for v in losses[-2:]) and rep["cv_log_loss"] == best
    _, rep = fit_head(X, y, head="linear-svm", C="auto", cv=3, select="accuracy")
    means = [g["mean"] for g in rep["cv_grid"]]
    assert rep["cv_score_mean"] == max(means) and rep["cv_select"] == "accuracy"


def test_final_logreg_fit_starts_from_the_folds_solution(fm_embeddings):
    """A warm start from the CV folds needs fewer lbfgs passes and lands on the same head."""
    X, y = fm_embeddings
    warm, rep = fit_head(X, y, head="logreg", C="auto", cv=3)
    cold, _ = fit_head(X, y, head="logreg", C=rep["C"])
    assert warm[-1].n_iter_[0] < cold[-1].n_iter_[0]
    T = rep["calibration"]["temperature"]  # folded into the auto head's coefficients
    cold[-1].coef_, cold[-1].intercept_ = cold[-1].coef_ / T, cold[-1].intercept_ / T
    assert warm[-1].get_params()["warm_start"] is False
    agree = (warm.predict(X) == cold.predict(X)).mean()
    assert agree >= 0.99
    np.testing.assert_allclose(warm.predict_proba(X), cold.predict_proba(X), atol=0.02)


def test_C_search_is_reproducible_with_parallel_folds(fm_embeddings):
    X, y = fm_embeddings
    runs = [fit_head(X, y, head=h, C="auto", cv=3)[1] for h in ("logreg", "logreg", "linear-svm", "linear-svm")]
    assert runs[0]["cv_grid"] == runs[1]["cv_grid"] and runs[2]["cv_grid"] == runs[3]["cv_grid"]


def test_linear_svm_grid_converges(fm_embeddings):
    """Every fit of the linear SVM's C search converges (the old grid ran to C=10: 5 minutes,
    unconverged, for one fit on 2,000 x 1,280)."""
    X, y = fm_embeddings
    _, rep = fit_head(X, y, head="linear-svm", C="auto", cv=3)
    assert all(g["converged"] for g in rep["cv_grid"]), rep["cv_grid"]
    assert rep["converged"] and rep["cv_score_mean"] > 0.6


def table_of(path: Path, X: np.ndarray, labels, bb) -> Path:
    return write_table(path, EmbeddingTable(
        paths=[f"{lab}/{i}.png" for i, lab in enumerate(labels)], labels=list(labels),
        keys=[f"k{i}" for i in range(len(labels))], X=X,
        meta={"backbone": bb.name, "fingerprint": bb.fingerprint, "dim": bb.dim,
              "backbone_path": str(bb.onnx_path.parent)}))


@pytest.mark.parametrize("head", ["logreg", "svm-rbf"])
def test_ctrl_c_stops_fit_head_with_its_own_message(fm_embeddings, lite0, tmp_path, head):
    """lbfgs returns to Python often; libsvm does not, and is run where Ctrl-C can reach."""
    X, y = fm_embeddings
    table_of(tmp_path / "fm.featx.parquet", X, y, lite0)
    proc = subprocess.Popen([sys.executable, "-m", "featx.cli", "-v", "fit-head", "--C", "auto",
                             "--head", head],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            # a shell's background job ignores SIGINT, and so would Python started from it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # the first grid point's log line: the search has started and has more to go
    for line in proc.stderr:
        if "CV score" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "interrupted: no head was written" in err
    assert "embedded so far" not in err and "Traceback" not in err
    assert not (tmp_path / "head.featx").exists()
