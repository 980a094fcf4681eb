"""The one-file ONNX classifier agrees with `featx predict` on the same images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from featx.cli import main
from featx.datasets import FASHION_MNIST_CLASSES, fashion_mnist
from featx.embed.images import load_image
from featx.embed.runtime import make_session
from featx.engines.files import embed_arrays
from featx.heads.fit import fit_head
from featx.heads.headfile import save_head
from featx.predict import predict
from featx.sampling import per_class_subset

from .helpers import needs_fashion_mnist

pytestmark = needs_fashion_mnist


@pytest.fixture(scope="module")
def data(lite0, tmp_path_factory):
    """Train embeddings (arrays) and a folder of test PNGs, 4 classes."""
    from featx.datasets import write_image_folder

    keep = [0, 3, 5, 7]  # t-shirt, dress, sandal, sneaker
    x, y = fashion_mnist("train")
    idx = per_class_subset(y, 10, seed=5)
    idx = idx[np.isin(y[idx], keep)]
    X = embed_arrays(x[idx], lite0)
    names = [FASHION_MNIST_CLASSES[c] for c in y[idx]]
    xt, yt = fashion_mnist("test")
    tidx = per_class_subset(yt, 3, seed=5)
    tidx = tidx[np.isin(yt[tidx], keep)]
    folder = write_image_folder(tmp_path_factory.mktemp("onnx") / "test", xt[tidx], yt[tidx],
                                FASHION_MNIST_CLASSES)
    return X, names, folder


@pytest.mark.parametrize("head", ["logreg", "linear-svm", "svm-rbf"])
def test_one_file_classifier_equals_predict(data, lite0, tmp_path, head):
    X, names, folder = data
    pipe, rep = fit_head(X, names, head=head, C=1.0)
    hp = save_head(tmp_path / "h.joblib", pipe, rep["classes"], lite0, rep)
    out = tmp_path / "classifier.onnx"
    r = CliRunner().invoke(main, ["export-classifier", str(hp), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["outputs"] == ["probabilities", "label"] and info["classes"] == rep["classes"]

    ref = predict(hp, [folder])
    assert len(ref.files) == 12
    pixels = np.stack([load_image(f, lite0.preprocess) for f in ref.files])
    sess, _ = make_session(out, device="cpu")
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    proba, labels = sess.run(None, {sess.get_inputs()[0].name: pixels})
    assert [str(v) for v in labels] == ref.labels
    np.testing.assert_allclose(proba, ref.proba, atol=1e-5)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    assert np.mean([lab == Path(f).parent.name for lab, f in zip(labels, ref.files, strict=True)]) >= 0.75

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["featx.classes"]) == rep["classes"]
    assert json.loads(meta["featx.preprocess"]) == json.loads(lite0.preprocess.canonical())
    assert meta["featx.fingerprint"] == lite0.fingerprint


def test_bare_logistic_regression_head(data, lite0, tmp_path):
    """A head that is a bare LogisticRegression (as a fine-tuning run writes), classes_ = names."""
    from sklearn.linear_model import LogisticRegression

    from featx.heads.onnx_classifier import export_classifier

    X, names, folder = data
    lr = LogisticRegression(C=0.1, max_iter=1000).fit(X, names)
    assert lr.classes_.dtype.kind == "U"
    hp = save_head(tmp_path / "h.joblib", lr, [str(c) for c in lr.classes_], lite0, {})
    ref = predict(hp, [folder])
    assert ref.classes == [str(c) for c in lr.classes_]
    out = tmp_path / "c.onnx"
    export_classifier(hp, out)
    sess, _ = make_session(out, device="cpu")
    pixels = np.stack([load_image(f, lite0.preprocess) for f in ref.files])
    proba, labels = sess.run(None, {sess.get_inputs()[0].name: pixels})
    assert [str(v) for v in labels] == ref.labels
    np.testing.assert_allclose(proba, ref.proba, atol=1e-5)
