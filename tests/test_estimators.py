"""FeatXEmbedder / FeatXClassifier: sklearn's own checks, and the contract on real images."""

from __future__ import annotations

import json
import logging
import pickle
import re

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from featx import FeatXClassifier, FeatXEmbedder
from featx.cli import main
from featx.datasets import FASHION_MNIST_CLASSES, fashion_mnist
from featx.errors import FeatXError
from featx.estimators import ImageInputError
from featx.sampling import per_class_subset

from .helpers import make_image_folder, needs_fashion_mnist, photos

# ---- sklearn's estimator checks --------------------------------------------------------------
# These checks fit on random float feature matrices (n_samples, n_features). featx estimators
# take images (paths or uint8 (N, H, W[, 3]) arrays) and refuse a float matrix with a
# ValueError, so every check that needs a successful fit on such data cannot apply. The
# property each one guards is tested below on real images where it means something for us
# (named in brackets).
TABULAR = "fits on a float feature matrix; featx estimators take images"
NOT_APPLICABLE = {
    "check_fit_score_takes_y": TABULAR,
    "check_estimators_overwrite_params": f"{TABULAR} [test_clone_params_and_pickle]",
    "check_dont_overwrite_parameters": f"{TABULAR} [test_clone_params_and_pickle]",
    "check_estimators_fit_returns_self": f"{TABULAR} [test_classifier_on_arrays]",
    "check_readonly_memmap_input": TABULAR,
    "check_n_features_in_after_fitting": f"{TABULAR}; images have no n_features_in_",
    "check_n_features_in": f"{TABULAR}; images have no n_features_in_",
    "check_positive_only_tag_during_fit": TABULAR,
    "check_estimators_dtypes": f"{TABULAR}; only uint8 pixels are images",
    "check_complex_data": TABULAR,
    "check_dtype_object": f"{TABULAR}; an object array is taken as a list of paths",
    "check_estimators_empty_data_messages": f"{TABULAR} [test_bad_input_is_refused_clearly]",
    "check_pipeline_consistency": f"{TABULAR} [test_pipeline_gridsearch_cross_val]",
    "check_estimators_nan_inf": f"{TABULAR}; uint8 pixels cannot be NaN",
    "check_estimators_pickle": f"{TABULAR} [test_clone_params_and_pickle]",
    "check_estimators_pickle(readonly_memmap=True)": TABULAR,
    "check_f_contiguous_array_estimator": TABULAR,
    "check_transformer_data_not_an_array": TABULAR,
    "check_transformer_general": f"{TABULAR} [test_embedder]",
    "check_transformer_general(readonly_memmap=True)": TABULAR,
    "check_transformers_unfitted_stateless": f"{TABULAR} [test_embedder: transform without fit]",
    "check_methods_sample_order_invariance": f"{TABULAR} [test_classifier_on_arrays]",
    "check_methods_subset_invariance": f"{TABULAR} [test_classifier_on_arrays]",
    "check_fit2d_1sample": TABULAR,
    "check_fit2d_1feature": TABULAR,
    "check_dict_unchanged": TABULAR,
    "check_fit_idempotent": f"{TABULAR} [test_classifier_on_arrays]",
    "check_fit_check_is_fitted": f"{TABULAR} [test_bad_input_is_refused_clearly]",
    "check_fit2d_predict1d": TABULAR,
    "check_classifier_data_not_an_array": TABULAR,
    "check_classifiers_classes": f"{TABULAR} [test_classifier_on_paths: string labels]",
    "check_classifiers_train": f"{TABULAR} [test_classifier_on_arrays]",
    "check_classifiers_train(readonly_memmap=True)": TABULAR,
    "check_classifiers_train(readonly_memmap=True,X_dtype=float32)": TABULAR,
    "check_supervised_y_2d": TABULAR,
    "check_class_weight_classifiers": f"{TABULAR} [tests/test_heads.py: balanced class weight]",
    "check_decision_proba_consistency": f"{TABULAR} [test_classifier_on_arrays]",
    **{name: f"{TABULAR} [tests/test_sample_weight.py]" for name in (
        "check_sample_weights_pandas_series", "check_sample_weights_not_an_array",
        "check_sample_weights_list", "check_all_zero_sample_weights_error", "check_sample_weights_shape",
        "check_sample_weights_not_overwritten", "check_sample_weight_equivalence_on_dense_data",
        "check_classifiers_one_label_sample_weights")},
}


def _expected_failed(estimator) -> dict[str, str]:
    if isinstance(estimator, FeatXClassifier):
        # y is validated first, so these fail for the reason sklearn wants (complex / 1-class y)
        return {k: v for k, v in NOT_APPLICABLE.items()
                if k not in ("check_complex_data", "check_fit2d_1sample")}
    return NOT_APPLICABLE


@parametrize_with_checks([FeatXEmbedder(), FeatXClassifier(C=1.0)],
                         expected_failed_checks=_expected_failed)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# ---- the contract on real images -------------------------------------------------------------

KEEP = [1, 5, 8]  # trouser, sandal, bag


@pytest.fixture(scope="module")
def arrays():
    """Fashion-MNIST as uint8 (N, 28, 28) arrays: 8 a class to train, 4 a class to test."""
    x, y = fashion_mnist("train")
    idx = per_class_subset(y, 12, seed=7)
    idx = idx[np.isin(y[idx], KEEP)]
    x, y = x[idx], np.array([FASHION_MNIST_CLASSES[c] for c in y[idx]])
    train = np.concatenate([np.flatnonzero(y == c)[:8] for c in np.unique(y)])
    test = np.setdiff1d(np.arange(len(y)), train)
    return x[train], y[train], x[test], y[test]


@needs_fashion_mnist
def test_classifier_on_arrays(arrays):
    X, y, Xt, yt = arrays
    clf = FeatXClassifier(C=1.0)
    assert clf.fit(X, y) is clf
    assert clf.classes_.tolist() == ["bag", "sandal", "trouser"]
    p = clf.predict_proba(Xt)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    pred = clf.predict(Xt)
    assert (pred == clf.classes_[p.argmax(1)]).all()
    assert clf.score(Xt, yt) >= 0.8
    d = clf.decision_function(Xt)
    assert d.shape == (len(Xt), 3) and (d.argmax(1) == p.argmax(1)).all()
    # order and subsets do not change an image's answer
    order = np.random.default_rng(0).permutation(len(Xt))
    np.testing.assert_allclose(clf.predict_proba(Xt[order]), p[order], rtol=1e-6)
    np.testing.assert_allclose(clf.predict_proba(Xt[:2]), p[:2], rtol=1e-6)
    # fitting twice gives the same model; a list of (H, W, 3) arrays is the same images
    again = FeatXClassifier(C=1.0).fit(list(np.repeat(X[..., None], 3, axis=3)), y)
    np.testing.assert_allclose(again.predict_proba(Xt), p, atol=1e-6)
    # two classes: decision_function is 1-d, positive means classes_[1]
    two = np.isin(y, ["bag", "sandal"])
    b = FeatXClassifier(C=1.0, head="linear-svm").fit(X[two], y[two])
    d2 = b.decision_function(Xt)
    assert d2.shape == (len(Xt),)
    assert ((d2 > 0) == (b.predict(Xt) == b.classes_[1])).all()


@needs_fashion_mnist
def test_clone_params_and_pickle(arrays):
    X, y, Xt, _ = arrays
    clf = FeatXClassifier(head="logreg", C=0.5, class_weight="balanced", random_state=3, n_jobs=1)
    params = clf.get_params()
    assert params["C"] == 0.5 and params["class_weight"] == "balanced"
    c2 = clone(clf)
    assert c2.get_params() == params and not hasattr(c2, "classes_")
    clf.fit(X, y)
    assert clf.get_params() == params  # fit must not touch the parameters
    assert clf.set_params(C=2.0) is clf and clf.C == 2.0
    clf.set_params(C=0.5)
    blob = pickle.dumps(clf)
    assert b"InferenceSession" not in blob  # no ONNX session travels in a pickle
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back.predict_proba(Xt), clf.predict_proba(Xt))


@needs_fashion_mnist
def test_pipeline_gridsearch_cross_val(arrays):
    X, y, Xt, yt = arrays
    pipe = Pipeline([("embed", FeatXEmbedder()), ("clf", LogisticRegression(max_iter=1000))])
    assert pipe.fit(X, y).score(Xt, yt) >= 0.8
    gs = GridSearchCV(FeatXClassifier(), {"C": [0.1, 1, 10]}, cv=3).fit(X, y)
    assert gs.best_params_["C"] in (0.1, 1, 10)
    assert gs.best_estimator_.score(Xt, yt) >= 0.8
    scores = cross_val_score(FeatXClassifier(C=1.0), X, y, cv=2)
    assert scores.shape == (2,) and scores.mean() >= 0.7


@needs_fashion_mnist
def test_embedder(arrays, lite0):
    X = arrays[0][:4]
    emb = FeatXEmbedder()
    E = emb.transform(X)  # stateless: no fit needed
    assert E.dtype == np.float32 and E.shape == (4, 4880)  # multi, as `featx extract`
    assert FeatXEmbedder(features="last").transform(X).shape == (4, 1280)
    np.testing.assert_array_equal(emb.fit_transform(X), E)
    assert emb.get_feature_names_out()[:2].tolist() == ["embedding0", "embedding1"]
    # grayscale (N, H, W) and RGB (N, H, W, 3) of the same pixels embed identically
    np.testing.assert_allclose(emb.transform(np.repeat(X[..., None], 3, axis=3)), E, atol=1e-5)


@needs_fashion_mnist
def test_classifier_on_paths_shares_the_cli_cache(tmp_path):
    """A default `featx extract` then a default FeatXClassifier: one export, one embedding per image."""
    from featx.backbones.resolve import resolve_backbone
    from featx.datasets import write_image_folder
    from featx.embed.scan import scan
    from featx.embed.store import EmbeddingStore

    x, y = fashion_mnist("test")
    idx = per_class_subset(y, 4, seed=11)
    idx = idx[np.isin(y[idx], KEEP)]
    root = write_image_folder(tmp_path / "imgs", x[idx], y[idx], FASHION_MNIST_CLASSES)
    r = CliRunner().invoke(main, ["extract", str(root), "--out", str(tmp_path / "t.parquet"), "-q"])
    assert r.exit_code == 0, r.output
    from featx.embed.table import read_table

    meta = read_table(tmp_path / "t.parquet").meta
    bb = resolve_backbone(meta["backbone_path"])
    store = EmbeddingStore(bb)
    n = len(store.keys())
    items = scan(root).items
    paths = [str(root / it.path) for it in items]
    labels = [it.label for it in items]
    clf = FeatXClassifier(C=1.0).fit(paths, labels)
    # the same export as the CLI's default (multi), and every image came from the cache
    assert clf.backbone_fingerprint_ == bb.fingerprint == meta["fingerprint"]
    assert bb.dim == 4880 and len(EmbeddingStore(bb).keys()) == n
    assert clf.classes_.tolist() == ["bag", "sandal", "trouser"]
    assert clf.score(paths, labels) == 1.0
    # and a fitted estimator is a head file the CLI can use
    hp = clf.save_head(tmp_path / "h.joblib")
    r = CliRunner().invoke(main, ["predict", str(hp), str(root), "--json"])
    assert r.exit_code == 0, r.output
    got = {p["path"]: p["label"] for p in json.loads(r.output)["predictions"]}
    assert [got[p] for p in paths] == clf.predict(paths).tolist()


def test_classifier_chooses_the_segment_as_fit_head_does(arrays):
    """segment= is fit-head's --segment: the same CV choice, a widened last-segment head."""
    from featx.backbones.resolve import resolve_backbone
    from featx.heads.segment import last_segment

    xtr, ytr, xte, _ = arrays
    cols = last_segment(resolve_backbone("efficientnet_lite0", features="multi").meta["features"])
    last = FeatXClassifier(segment="last", C=1.0).fit(xtr, ytr)
    assert last.report_["segment"] == "last" and last.report_["segment_columns"] == [cols.start, cols.stop]
    coef = last.pipeline_[-1].coef_
    assert coef.shape[1] == 4880 and not coef[:, :cols.start].any()  # widened: other columns weigh 0
    narrow = FeatXClassifier(features="last", C=1.0).fit(xtr, ytr)
    np.testing.assert_allclose(last.predict_proba(xte), narrow.predict_proba(xte), atol=1e-3)
    auto = FeatXClassifier().fit(xtr, ytr)  # C="auto", segment="auto": both scored
    assert set(auto.report_["segment_cv"]) == {"all", "last"}
    assert FeatXClassifier(C=1.0).fit(xtr, ytr).report_["segment"] == "all"
    with pytest.raises(FeatXError, match="unknown segment 'middle'"):
        FeatXClassifier(segment="middle").fit(xtr, ytr)


class _StopAt(logging.Handler):
    """Ctrl-C at the progress line that matches ``pattern``: a real interrupt mid-run."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def emit(self, record) -> None:
        if self.pattern.search(record.getMessage()):
            raise KeyboardInterrupt


def test_verbose_progress_and_ctrl_c_keep_what_was_embedded(arrays, caplog):
    """verbose= logs progress (no print); Ctrl-C keeps the embedded images and leaves no half fit."""
    from featx.backbones.resolve import resolve_backbone
    from featx.embed.store import EmbeddingStore
    from featx.engines.files import array_key

    xtr, ytr, _, _ = arrays
    X = 255 - xtr  # negatives: images no other test has embedded
    store = EmbeddingStore(resolve_backbone("efficientnet_lite0", features="multi"))
    keys = [array_key(a) for a in X]
    assert not store.stored(keys)
    logger = logging.getLogger("featx.estimators")
    caplog.set_level(logging.INFO, logger="featx.estimators")
    stop = _StopAt(r"embed 8/24\b")
    logger.addHandler(stop)
    clf = FeatXClassifier(C=1.0, batch_size=4, verbose=2)
    try:
        with pytest.raises(KeyboardInterrupt, match=r"fit interrupted while embedding: 8 of the 24 images "
                                                    r".* in the embedding store.*the estimator was not changed"):
            clf.fit(X, ytr)
    finally:
        logger.removeHandler(stop)
    assert len(store.stored(keys)) == 8  # the batches done are kept
    assert not hasattr(clf, "classes_")  # and nothing of a half fit
    caplog.clear()
    clf.fit(X, ytr)  # the same call again embeds only the other 16
    lines = [r.getMessage() for r in caplog.records]
    assert "FeatXClassifier: embed 0/16 (0%)" in lines and any(m.startswith("FeatXClassifier: embed 16/16") for m in lines)
    assert len(store.stored(keys)) == 24 and (clf.predict(X) == ytr).mean() > 0.8
    # a refit interrupted keeps the previous fit whole
    fitted = (clf.classes_, clf.pipeline_, clf.backbone_fingerprint_)
    stop = _StopAt(r"embed 4/24\b")
    logger.addHandler(stop)
    try:
        with pytest.raises(KeyboardInterrupt, match="a previous fit, if any, is kept"):
            clf.fit(np.ascontiguousarray(X[:, ::-1]), ytr)
    finally:
        logger.removeHandler(stop)
    assert all(a is b for a, b in zip((clf.classes_, clf.pipeline_, clf.backbone_fingerprint_), fitted,
                                      strict=True))
    with pytest.raises(ImageInputError, match="verbose must be an integer >= 0"):
        FeatXEmbedder(verbose=-1).transform(X[:1])


def test_bad_input_is_refused_clearly(tmp_path):
    clf = FeatXClassifier(C=1.0)
    with pytest.raises(ImageInputError, match=r"got a float64 array of shape \(3, 4\)"):
        clf.fit(np.zeros((3, 4)), [0, 1, 0])
    with pytest.raises(ValueError, match="only one class"):
        clf.fit(np.zeros((3, 8, 8), np.uint8), [1, 1, 1])
    with pytest.raises(ImageInputError, match="3 images but 2 labels"):
        clf.fit(np.zeros((3, 8, 8), np.uint8), [0, 1])
    with pytest.raises(ImageInputError, match="single path"):
        FeatXEmbedder().transform("cat.jpg")
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        clf.predict(np.zeros((1, 8, 8), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(FeatXError, match=r"1 of 1 images could not be read: .*broken\.png"):
        FeatXEmbedder().transform([str(tmp_path / "broken.png")])


@needs_fashion_mnist
def test_arrays_embedded_before_an_error_are_kept(lite0):
    from featx.embed.store import EmbeddingStore
    from featx.engines.files import array_key, embed_arrays
    from featx.errors import ImageError

    x, _ = fashion_mnist("test")
    imgs = [*list(x[-40:]), np.zeros(5, np.uint8)]  # the 41st is not an image
    with pytest.raises(ImageError, match=r"image 40: array shape must be"):
        embed_arrays(imgs, lite0, batch_size=16)
    stored = EmbeddingStore(lite0).keys()
    assert sum(array_key(a) in stored for a in imgs[:40]) == 32  # two whole batches were flushed


def test_classifier_finetune_path(arrays, tmp_path):
    """FeatXClassifier(finetune=True): LP-FT through featx.finetune, a tiny real run."""
    xtr, ytr, xte, _ = arrays
    clf = FeatXClassifier(finetune=True, run_dir=str(tmp_path / "run"), device="cpu",
                          finetune_options={"epochs": 1, "unfreeze": 1, "input_size": 64, "patience": None,
                                            "lp_C": 0.1})
    assert clone(clf).get_params()["finetune_options"]["epochs"] == 1
    clf.fit(xtr, ytr)
    assert list(clf.classes_) == sorted(set(ytr)) and clf.run_dir_ == str(tmp_path / "run")
    p = clf.predict_proba(xte)
    assert p.shape == (len(xte), len(clf.classes_)) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert set(clf.predict(xte)) <= set(clf.classes_)
    assert clf.decision_function(xte).shape[0] == len(xte)
    assert clf.backbone_fingerprint_ != FeatXClassifier().fit(xtr, ytr).backbone_fingerprint_
    # the run's own head file predicts the same as the estimator
    from featx.heads.headfile import load_head

    assert load_head(tmp_path / "run").fingerprint == clf.backbone_fingerprint_


# ---- scikit-learn conventions: PIL input, random_state, n_jobs, clear errors ---------------


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """8 real photos (cats vs things) as files, and their labels."""
    from featx.embed.scan import scan

    root = make_image_folder(tmp_path_factory.mktemp("est") / "data")
    items = scan(root).items
    return [str(root / it.path) for it in items], [it.label for it in items]


def test_pil_images_embed_like_the_same_pixels(lite0, tmp_path):
    from PIL import Image

    arrays = [photos()[n] for n in ("chelsea", "coffee", "camera")]
    pil = [Image.fromarray(a) for a in arrays]
    emb = FeatXEmbedder()
    E = emb.transform(pil)
    assert E.shape == (3, 4880) and E.dtype == np.float32
    np.testing.assert_allclose(E, emb.transform(arrays), atol=1e-5)
    # PNG files of the same pixels decode to the same pixels
    paths = []
    for i, im in enumerate(pil):
        im.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    np.testing.assert_allclose(E, emb.transform(paths), atol=1e-5)
    # other PIL modes are converted as featx's loader converts them: palette, grayscale,
    # and alpha composited on white exactly as for an (H, W, 4) array
    rgba = pil[0].convert("RGBA")
    rgba.putalpha(128)
    odd = [pil[1].convert("P"), pil[2], rgba]
    same = [np.asarray(odd[0].convert("RGB")), arrays[2], np.asarray(rgba)]
    np.testing.assert_allclose(emb.transform(odd), emb.transform(same), atol=1e-5)
    # arrays and PIL images may be mixed; paths may not be mixed with in-memory images
    np.testing.assert_allclose(emb.transform([pil[0], arrays[1]]), E[:2], atol=1e-5)
    with pytest.raises(ImageInputError, match="single PIL image"):
        emb.transform(pil[0])
    with pytest.raises(ImageInputError, match="got elements of type Image, str"):
        emb.transform([pil[0], paths[0]])


def test_classifier_fits_pil_images(photo_folder):
    from PIL import Image

    paths, labels = photo_folder
    clf = FeatXClassifier(C=1.0).fit([Image.open(p) for p in paths], labels)
    assert clf.predict(paths).tolist() == labels


def test_random_state_replaces_seed(photo_folder):
    paths, labels = photo_folder
    assert "random_state" in FeatXClassifier().get_params()
    a = FeatXClassifier(C="auto", cv=2, random_state=3).fit(paths, labels)
    with pytest.warns(FutureWarning, match=r"seed=\.\.\.\) was renamed random_state="):
        b = FeatXClassifier(C="auto", cv=2, seed=3).fit(paths, labels)
    assert (a.report_["C"], a.report_["cv_score_mean"]) == (b.report_["C"], b.report_["cv_score_mean"])
    np.testing.assert_array_equal(a.predict_proba(paths), b.predict_proba(paths))
    with pytest.raises(ImageInputError, match="pass random_state= only"):
        FeatXClassifier(seed=3, random_state=4).fit(paths, labels)
    # sklearn's other random_state forms: None (a fresh seed) and a RandomState
    for rs in (None, np.random.RandomState(0)):
        assert FeatXClassifier(C=1.0, random_state=rs).fit(paths, labels).classes_.tolist() == ["cat", "thing"]
    assert clone(FeatXClassifier(seed=3)).get_params()["seed"] == 3


def test_n_jobs_are_decode_threads(photo_folder):
    paths, _ = photo_folder
    E = FeatXEmbedder(n_jobs=1).transform(paths)
    np.testing.assert_array_equal(FeatXEmbedder(n_jobs=-2).transform(paths), E)
    with pytest.warns(FutureWarning, match="renamed n_jobs="):
        np.testing.assert_array_equal(FeatXEmbedder(workers=2).transform(paths), E)
    with pytest.raises(ImageInputError, match="n_jobs must be a non-zero integer or None, got 0"):
        FeatXEmbedder(n_jobs=0).transform(paths)
    from featx.estimators import n_jobs_threads

    assert n_jobs_threads(None) is None and n_jobs_threads(3) == 3
    assert n_jobs_threads(-1) == (__import__("os").cpu_count() or 1)


def test_mistyped_path_says_no_such_file(photo_folder, tmp_path, monkeypatch):
    paths, labels = photo_folder
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImageInputError, match=r"FeatXEmbedder: no such file: 'cta\.jpg'; relative "
                                              r"paths are read from the current folder"):
        FeatXEmbedder().transform(["cta.jpg"])
    typo = [*paths[:-1], paths[-1] + "x"]
    with pytest.raises(ImageInputError, match=r"no such file: '.*\.jpgx'|no such file: '.*x'"):
        FeatXClassifier(C=1.0).fit(typo, labels)
    with pytest.raises(ImageInputError, match=r"2 of 3 paths are no such file"):
        FeatXEmbedder().transform([paths[0], "a.jpg", "b.jpg"])
    with pytest.raises(ImageInputError, match="a folder, not an image file"):
        FeatXEmbedder().transform([str(tmp_path)])


def test_empty_fit_says_empty():
    with pytest.raises(ImageInputError, match=r"got no labels \(y is empty\); it needs labelled "
                                              "images of at least 2 classes"):
        FeatXClassifier().fit([], [])
    with pytest.raises(ImageInputError, match="got 0 images"):
        FeatXEmbedder().transform([])
