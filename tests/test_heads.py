"""Heads on real embeddings (Fashion-MNIST through the real backbone) and the head file."""

from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path

import joblib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from featx.backbones.resolve import resolve_backbone
from featx.datasets import FASHION_MNIST_CLASSES, fashion_mnist
from featx.engines.files import embed_arrays
from featx.errors import FeatXError
from featx.heads.fit import C_GRID, fit_head
from featx.heads.headfile import HeadFileError, load_head, read_header, save_head
from featx.sampling import per_class_subset

from .helpers import needs_fashion_mnist

pytestmark = needs_fashion_mnist

CLASSES = [0, 1, 4, 8]  # t-shirt, trouser, coat, bag


def fm_embeddings(lite0, split: str, per_class: int, seed: int = 0):
    x, y = fashion_mnist(split)
    idx = per_class_subset(y, per_class, seed)
    idx = idx[np.isin(y[idx], CLASSES)]
    X = embed_arrays(x[idx], lite0)
    return X, np.array([FASHION_MNIST_CLASSES[c] for c in y[idx]])


@pytest.fixture(scope="module")
def train(lite0):
    return fm_embeddings(lite0, "train", 15)


@pytest.fixture(scope="module")
def test(lite0):
    return fm_embeddings(lite0, "test", 10, seed=1)


def test_logreg_pipeline_is_scaler_then_logreg(train, test):
    X, y = train
    pipe, rep = fit_head(X, y, head="logreg", C=0.1)
    # the fine-tuning path folds these two steps into one linear layer: keep the shape exact
    assert [name for name, _ in pipe.steps] == ["scaler", "clf"]
    assert type(pipe[0]) is StandardScaler and type(pipe[1]) is LogisticRegression
    assert rep["classes"] == sorted({str(v) for v in y})
    assert pipe.classes_.tolist() == list(range(len(rep["classes"])))
    assert rep["C"] == 0.1 and rep["C_auto"] is False and rep["converged"]
    assert rep["class_counts"] == {c: 15 for c in rep["classes"]}
    Xt, yt = test
    p = pipe.predict_proba(Xt)
    pred = np.array(rep["classes"])[p.argmax(1)]
    assert (pred == yt).mean() >= 0.8  # 15 examples a class; chance is 0.25


@pytest.mark.parametrize("head", ["logreg", "linear-svm", "svm-rbf"])
def test_every_head_gives_probabilities(train, test, head):
    X, y = train
    pipe, rep = fit_head(X, y, head=head, C=1.0)
    p = pipe.predict_proba(test[0])
    assert p.shape == (len(test[0]), 4)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    assert (p >= 0).all()
    assert (np.array(rep["classes"])[p.argmax(1)] == test[1]).mean() >= 0.75


def test_C_auto_reports_choice_and_spread(train):
    X, y = train
    pipe, rep = fit_head(X, y, head="logreg", C="auto", cv=3)
    assert rep["C_auto"] and rep["C"] in C_GRID and rep["cv_folds"] == 3
    assert [g["C"] for g in rep["cv_grid"]] + rep["cv_skipped"] == list(C_GRID)
    # logreg's C is the one with the lowest out-of-fold log-loss; its CV accuracy is reported
    best = min(rep["cv_grid"], key=lambda g: (round(g["log_loss"], 6), g["C"]))
    assert rep["cv_select"] == "log_loss" and rep["C"] == best["C"]
    assert rep["cv_score_mean"] == pytest.approx(best["mean"])
    assert rep["cv_log_loss"] == pytest.approx(best["log_loss"])
    assert 0 < rep["cv_score_std"] < 0.5
    assert rep["C"] == pipe[-1].C


def test_balanced_class_weight_helps_the_minority(lite0):
    def pick(split, n_shirt, n_tshirt):  # two look-alike garments
        x, y = fashion_mnist(split)
        idx = np.concatenate([np.flatnonzero(y == 6)[:n_shirt], np.flatnonzero(y == 0)[:n_tshirt]])
        return embed_arrays(x[idx], lite0), np.array([FASHION_MNIST_CLASSES[c] for c in y[idx]])

    # 30 shirts vs 3 t-shirts: an unweighted head learns to say "shirt"
    X, names = pick("train", 30, 3)
    Xt, yt = pick("test", 20, 20)
    recall = {}
    for cw in (None, "balanced"):
        pipe, rep = fit_head(X, names, head="logreg", C=0.01, class_weight=cw)
        pred = np.array(rep["classes"])[pipe.predict_proba(Xt).argmax(1)]
        recall[cw] = (pred[yt == "t-shirt"] == "t-shirt").mean()
    assert recall["balanced"] > recall[None]


def test_fit_head_refuses_bad_input(train):
    X, y = train
    with pytest.raises(FeatXError, match="unknown head 'knn'"):
        fit_head(X, y, head="knn")
    with pytest.raises(FeatXError, match="at least 2 classes"):
        fit_head(X[:5], ["a"] * 5, C=1.0)
    with pytest.raises(FeatXError, match="C must be"):
        fit_head(X, y, C="big")
    with pytest.raises(FeatXError, match="smallest class has 1"):
        fit_head(X[:4], ["a", "a", "a", "b"], C="auto")
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(FeatXError, match="NaN"):
        fit_head(bad, y, C=1.0)


# ---- head file -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted(train):
    return fit_head(*train, head="logreg", C=0.1)


def test_head_file_round_trip(tmp_path, lite0, fitted, test):
    pipe, rep = fitted
    path = save_head(tmp_path / "h.joblib", pipe, rep["classes"], lite0, rep)
    h = load_head(path)
    assert h.classes == rep["classes"] and h.fingerprint == lite0.fingerprint
    assert resolve_backbone(h.backbone_dir).fingerprint == lite0.fingerprint
    assert h.preprocess == lite0.preprocess
    assert h.meta["train"]["C"] == 0.1 and h.meta["versions"]["sklearn"]
    assert h.meta["format"] == 2 and [s["kind"] for s in h.meta["model"]["steps"]] == [
        "standard_scaler", "logistic_regression"]
    np.testing.assert_array_equal(h.proba(test[0]), pipe.predict_proba(test[0]))
    # a directory holding head.featx is a head too (fine-tuning run directories)
    (tmp_path / "run").mkdir()
    # a caller's summary may hold numpy values and paths: stored as plain JSON
    summary = {"epochs": np.int64(3), "loss": np.float32(0.25), "curve": np.arange(3), "dir": tmp_path}
    save_head(tmp_path / "run", pipe, rep["classes"], lite0, summary)
    h2 = load_head(tmp_path / "run")
    assert h2.classes == rep["classes"]
    assert h2.meta["train"] == {"epochs": 3, "loss": 0.25, "curve": [0, 1, 2], "dir": str(tmp_path)}


def test_plain_pickles_are_refused_before_unpickling(tmp_path, fitted):
    marker = tmp_path / "pwned"

    class Evil:  # unpickling this would create the marker file
        def __reduce__(self):
            return (Path.touch, (marker,))

    joblib.dump(Evil(), tmp_path / "evil.joblib")
    with pytest.raises(HeadFileError, match="not a featx head file"):
        load_head(tmp_path / "evil.joblib")
    joblib.dump(fitted[0], tmp_path / "plain.joblib")  # a real sklearn pipeline, but not ours
    with pytest.raises(HeadFileError, match="not a featx head file"):
        load_head(tmp_path / "plain.joblib")
    assert not marker.exists()


def test_tampered_head_is_refused(tmp_path, lite0, fitted):
    pipe, rep = fitted
    path = save_head(tmp_path / "h.joblib", pipe, rep["classes"], lite0, rep)
    _, payload, _ = read_header(path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    # swap the payload for a malicious pickle, keep the genuine header
    data = path.read_bytes()
    evil = pickle.dumps(Evil())
    path.write_bytes(data[:len(data) - len(payload)] + evil)
    with pytest.raises(HeadFileError, match="integrity check failed"):
        load_head(path)
    assert not marker.exists()
    # one flipped byte in the payload
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(HeadFileError, match="integrity check failed"):
        load_head(path)
    path.write_bytes(data[:40])
    with pytest.raises(HeadFileError, match="damaged"):
        load_head(path)


def test_edited_header_is_refused(tmp_path, lite0, fitted):
    """Data heads carry no signature, but an edit to the header is still caught as damage."""
    pipe, rep = fitted
    path = save_head(tmp_path / "h.joblib", pipe, rep["classes"], lite0, rep)
    header, payload, _ = read_header(path)
    header["classes"] = list(reversed(header["classes"]))
    hb = json.dumps(header).encode()
    path.write_bytes(b"FEATX-HEAD\n" + f"{len(hb)}\n".encode() + hb + payload)
    with pytest.raises(HeadFileError, match="header was modified"):
        load_head(path)


def test_missing_head_file_names_the_path(tmp_path):
    with pytest.raises(HeadFileError, match=r"nope\.joblib: no such head file"):
        load_head(tmp_path / "nope.joblib")
    with pytest.raises(HeadFileError, match="no such head file"):
        load_head(tmp_path)  # a directory without head.featx


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=300), magic=st.booleans())
def test_any_bytes_are_refused_with_a_head_file_error(body, magic):
    """Garbage, with or without the marker, is a HeadFileError: never unpickled, never a crash."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.joblib"
        p.write_bytes((b"FEATX-HEAD\n" if magic else b"") + body)
        with pytest.raises(HeadFileError):
            load_head(p)


def test_cv_folds_default_to_three_from_6000_rows_and_an_explicit_cv_is_kept():
    """Every CV row is scored once whatever the folds; from 6,000 rows 3 folds save 40%."""
    x, y = fashion_mnist("train")
    X = x[:6000, ::4, ::4].reshape(6000, -1).astype(np.float32)  # 7x7 real pixels: quick fits
    labels = np.array([FASHION_MNIST_CLASSES[c] for c in y[:6000]])
    assert fit_head(X, labels, C="auto")[1]["cv_folds"] == 3
    assert fit_head(X[:5990], labels[:5990], C="auto")[1]["cv_folds"] == 5
    assert fit_head(X, labels, C="auto", cv=5)[1]["cv_folds"] == 5
