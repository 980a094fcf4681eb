"""Probabilities that mean what they say: C by log-loss, temperature from the search's
out-of-fold probabilities (in the head file and the ONNX classifier), "unknown" for images
unlike the training ones, conformal prediction sets.

Real embeddings of real images throughout: scikit-image's LFW faces and photos,
Fashion-MNIST through the default backbone.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from featx.datasets import FASHION_MNIST_CLASSES, fashion_mnist, write_image_folder
from featx.embed.images import load_image
from featx.embed.runtime import make_session
from featx.engines.files import embed_arrays
from featx.errors import FeatXError
from featx.evaluate import calibration
from featx.heads.fit import choose_C, fit_head, fit_head_full
from featx.heads.headfile import HeadFileError, load_head, read_header, save_head
from featx.heads.novelty import fit_novelty
from featx.predict import predict
from featx.sampling import per_class_subset

from .helpers import needs_fashion_mnist, photos, run_cli


@pytest.fixture(scope="module")
def lfw(lite0):
    """skimage's LFW subset (100 faces, 100 other patches, 25 x 25): half to train, half to test."""
    import skimage.data as sd

    x = (sd.lfw_subset() * 255).round().astype(np.uint8)
    y = np.array(["face"] * 100 + ["other"] * 100)
    X = embed_arrays(list(x), lite0)
    rng = np.random.default_rng(0)
    tr = np.sort(np.concatenate([rng.permutation(100)[:50], 100 + rng.permutation(100)[:50]]))
    te = np.setdiff1d(np.arange(200), tr)
    return X[tr], y[tr], X[te], y[te]


def test_small_data_head_is_as_sure_as_it_is_right(lfw):
    """On 100 LFW images the old C search took the smallest C (1e-4): 98% right, median top
    probability 0.62, ECE 0.38. Now the head is about as confident as it is accurate."""
    X, y, Xt, yt = lfw
    pipe, rep = fit_head(X, y, C="auto", seed=1)
    p = pipe.predict_proba(Xt)
    right = np.array(rep["classes"])[p.argmax(1)] == yt
    assert right.mean() >= 0.95
    assert np.median(p.max(1)) >= 0.9
    assert calibration(p.max(1), right)["ece"] <= 0.08
    cal = rep["calibration"]
    assert cal["method"] == "temperature" and 0.05 <= cal["temperature"] <= 20
    assert "out-of-fold" in cal["fitted_on"]


def test_C_is_chosen_by_out_of_fold_log_loss_and_their_probabilities_are_returned(lfw):
    X, y, _, _ = lfw
    codes = (y == "other").astype(np.int64)
    choice = choose_C(X, codes, "logreg", None, 5, seed=0)
    assert choice.select == "log_loss"
    best = min(choice.grid, key=lambda g: (round(g["log_loss"], 6), g["C"]))
    assert best["C"] == choice.C
    # one out-of-fold probability row per cross-validated row, from a model that did not see it
    assert choice.oof_proba.shape == (100, 2) and sorted(choice.oof_rows) == list(range(100))
    np.testing.assert_allclose(choice.oof_proba.sum(1), 1.0)
    np.testing.assert_array_equal(choice.oof_codes, codes[choice.oof_rows])
    assert (choice.oof_proba.argmax(1) == choice.oof_codes).mean() >= 0.9
    # a fixed C: the same function gives that C's out-of-fold probabilities
    one = choose_C(X, codes, "logreg", None, 5, seed=0, grid=[0.01])
    assert one.C == 0.01 and one.oof_proba.shape == (100, 2)
    # the SVMs' search is scored uncalibrated: accuracy, no probabilities
    svm = choose_C(X, codes, "linear-svm", None, 3, seed=0)
    assert svm.select == "accuracy" and svm.oof_proba is None
    with pytest.raises(FeatXError, match="unknown C selection"):
        choose_C(X, codes, "logreg", None, 3, seed=0, select="f1")


def test_temperature_is_folded_into_the_head_and_recorded(lfw, lite0, tmp_path):
    X, y, Xt, _ = lfw
    fit = fit_head_full(X, y, C="auto", seed=0)
    T = fit.report["calibration"]["temperature"]
    raw, _ = fit_head(X, y, C=fit.report["C"])  # the same C, uncalibrated
    assert fit_head(X, y, C=1.0)[1]["calibration"]["method"] == "none"
    z = raw.decision_function(Xt) / T
    # the auto fit starts from the folds' solution: the same optimum to a few 1e-3
    np.testing.assert_allclose(fit.pipeline.predict_proba(Xt)[:, 1], 1 / (1 + np.exp(-z)), atol=5e-3)
    path = save_head(tmp_path / "h.joblib", fit.pipeline, fit.report["classes"], lite0, fit.report,
                     fit.novelty, fit.conformal)
    header, _, _ = read_header(path)
    assert header["train"]["calibration"]["temperature"] == pytest.approx(T)
    h = load_head(path)
    np.testing.assert_allclose(h.pipeline.predict_proba(Xt), fit.pipeline.predict_proba(Xt), atol=1e-12)


def test_onnx_classifier_gives_the_calibrated_probabilities_of_predict(lite0, tmp_path):
    from .helpers import make_image_folder

    folder = make_image_folder(tmp_path / "data", per_class=6)
    r = run_cli("extract", str(folder), "--out", str(tmp_path / "t.featx.parquet"), "-q")
    run_cli("fit-head", "-e", str(tmp_path / "t.featx.parquet"), "--C", "auto", "--cv", "3",
            "--out", str(tmp_path / "head.featx"))
    h = load_head(tmp_path / "head.featx")
    cal = h.meta["train"]["calibration"]
    assert cal["method"] == "temperature" and abs(cal["temperature"] - 1) > 1e-3
    out = tmp_path / "classifier.onnx"
    r = run_cli("export-classifier", str(tmp_path / "head.featx"), "--out", str(out), "--json")
    assert json.loads(r.output)["check_max_abs_diff"] < 1e-4
    ref = predict(h, [folder])
    sess, _ = make_session(out, device="cpu")
    pixels = np.stack([load_image(f, lite0.preprocess) for f in ref.files])
    proba, labels = sess.run(["probabilities", "label"], {sess.get_inputs()[0].name: pixels})
    np.testing.assert_allclose(proba, ref.proba, atol=1e-5)
    assert [str(v) for v in labels] == [h.classes[j] for j in ref.proba.argmax(1)]
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["featx.calibration"])["temperature"] == pytest.approx(cal["temperature"])


def test_novelty_threshold_is_a_quantile_of_the_training_rows_own_distances(lfw):
    X, _, _, _ = lfw
    nov = fit_novelty(X, seed=0)
    assert len(nov.distances) == len(X) and nov.quantile == 0.99
    # out of sample: a row's own copy in the sample is left out, so no distance is 0
    assert nov.distances.min() > 0
    assert (nov.score(X) < 1e-3).all()  # the rows themselves are in the sample
    assert nov.threshold(1.0) == nov.distances.max() and nov.threshold(0.5) < nov.threshold()
    big = fit_novelty(np.repeat(X, 30, axis=0) + np.random.default_rng(0).normal(0, 1e-3, (3000, X.shape[1])).astype(np.float32),
                      max_sample=500)
    assert len(big.sample) == 500 and big.sample.dtype == np.float16 and len(big.distances) == 2500


@pytest.fixture(scope="module")
def fm_head(lite0, tmp_path_factory):
    """A Fashion-MNIST head (20 a class, 10 classes) fitted by the CLI, and 20 test images a class."""
    d = tmp_path_factory.mktemp("fm")
    x, y = fashion_mnist("train")
    idx = per_class_subset(y, 20, seed=0)
    write_image_folder(d / "train", x[idx], y[idx], FASHION_MNIST_CLASSES)
    xt, yt = fashion_mnist("test")
    tidx = per_class_subset(yt, 20, seed=1)
    write_image_folder(d / "test", xt[tidx], yt[tidx], FASHION_MNIST_CLASSES)
    run_cli("extract", str(d / "train"), "--out", str(d / "train.featx.parquet"), "-q")
    run_cli("fit-head", "-e", str(d / "train.featx.parquet"), "--out", str(d / "head.featx"))
    for name, a in photos().items():
        Image.fromarray(np.ascontiguousarray(a)).save(d / f"{name}.png")
    return d


@needs_fashion_mnist
def test_astronaut_is_unknown_to_a_fashion_mnist_head(fm_head, tmp_path):
    """It used to come out "shirt" with probability 1.000."""
    d = fm_head
    out = tmp_path / "p.csv"
    r = run_cli("predict", str(d / "head.featx"), str(d / "test"), str(d / "astronaut.png"),
                str(d / "coffee.png"), str(d / "camera.png"), "--out", str(out))
    assert "unknown" in r.output
    rows = {row["path"].rsplit("/", 1)[-1]: row for row in csv.DictReader(out.open())}
    for name in ("astronaut.png", "coffee.png", "camera.png"):
        assert rows[name]["unknown"] == "true" and rows[name]["label"] == "", rows[name]
        assert rows[name]["top1_class"]  # the probabilities are still there
    garments = [row for name, row in rows.items() if not name.endswith(("astronaut.png", "coffee.png", "camera.png"))]
    assert len(garments) == 200
    assert sum(row["unknown"] == "true" for row in garments) <= 10
    assert all(row["label"] == row["top1_class"] for row in garments if row["unknown"] == "false")
    # turned off: the label stays, the flag too
    r = run_cli("predict", str(d / "head.featx"), str(d / "astronaut.png"), "--no-unknown", "--json")
    p = json.loads(r.output)["predictions"][0]
    assert p["unknown"] is True and p["label"] == p["top"][0]["class"]
    # a quantile above every training distance still flags it; a bad one is refused
    r = run_cli("predict", str(d / "head.featx"), str(d / "astronaut.png"), "--unknown-quantile", "1",
                "--json")
    assert json.loads(r.output)["predictions"][0]["unknown"] is True
    run_cli("predict", str(d / "head.featx"), str(d / "astronaut.png"), "--unknown-quantile", "0", ok=False)


@needs_fashion_mnist
def test_coverage_gives_conformal_sets_that_hold_the_true_class(fm_head, tmp_path):
    d = fm_head
    r = predict(d / "head.featx", [d / "test"], coverage=0.9)
    assert r.sets is not None and r.sets.shape == r.proba.shape
    truth = np.array([r.classes.index(t) for t in r.true_labels])
    covered = r.sets[np.arange(len(truth)), truth].mean()
    assert covered >= 0.8  # 0.9 on average; 200 images
    assert (r.sets.sum(1) >= 1).mean() >= 0.95 and r.sets.sum(1).mean() < 5
    out = tmp_path / "p.csv"
    run_cli("predict", str(d / "head.featx"), str(d / "test"), "--coverage", "0.9", "--out", str(out))
    rows = list(csv.DictReader(out.open()))
    assert all(row["label"] in row["set"].split("|") for row in rows if row["label"] and row["set"])
    with pytest.raises(FeatXError, match="coverage"):
        predict(d / "head.featx", [d / "test"], coverage=0.9999)


@needs_fashion_mnist
def test_estimator_flags_unknown_images(lite0):
    from featx import FeatXClassifier

    x, y = fashion_mnist("train")
    idx = per_class_subset(y, 10, seed=0)
    idx = idx[np.isin(y[idx], [0, 1, 8])]
    clf = FeatXClassifier(C="auto", cv=3).fit(x[idx], y[idx])
    xt, yt = fashion_mnist("test")
    tidx = per_class_subset(yt, 5, seed=1)
    tidx = tidx[np.isin(yt[tidx], [0, 1, 8])]
    astro = photos()["astronaut"]
    assert clf.is_unknown([astro]).tolist() == [True]
    assert clf.is_unknown(xt[tidx]).sum() <= 2
    assert clf.novelty_score([astro])[0] > clf.novelty_score(xt[tidx]).max()
    sets = clf.predict_sets(xt[tidx], coverage=0.8)
    assert sets.shape == (len(tidx), 3)


def test_damaged_novelty_arrays_are_refused(lfw, lite0, tmp_path):
    X, y, _, _ = lfw
    fit = fit_head_full(X, y, C=1.0)
    assert fit.conformal is None and fit.novelty is not None  # no search, no out-of-fold rows
    fit.novelty.sample[0, 0] = np.inf
    path = save_head(tmp_path / "h.joblib", fit.pipeline, fit.report["classes"], lite0, fit.report,
                     fit.novelty)
    with pytest.raises(HeadFileError, match="novelty"):
        load_head(path)
