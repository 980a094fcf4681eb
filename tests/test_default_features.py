"""The default feature set is the one that wins: `featx extract` gives multi, fit-head picks
the whole vector or its last segment by CV, and the default flow beats raw pixels on digits.

Real data: scikit-learn's digits (8x8 scans, bundled with scikit-learn), the real default
backbone. bench/default_features.py measures the same on four data sets.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from featx.errors import FeatXError
from featx.extract import extract
from featx.fit_table import fit_table
from featx.heads.headfile import load_head
from featx.heads.segment import last_segment, widen


def digits_folders(root, per_class_train: int = 20, per_class_test: int = 20):
    from sklearn.datasets import load_digits

    from featx.sampling import per_class_subset

    d = load_digits()
    img = np.round(d.images * (255 / 16)).astype(np.uint8)
    idx = per_class_subset(d.target, per_class_train + per_class_test, 0)
    out = {}
    for split in ("train", "test"):
        n = per_class_train if split == "train" else per_class_test
        rows = []
        for c in range(10):
            mine = idx[d.target[idx] == c]
            rows += list(mine[:n] if split == "train" else mine[per_class_train:per_class_train + n])
        for i in rows:
            p = root / split / str(d.target[i])
            p.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[i]).save(p / f"{i:04d}.png")
        out[split] = (img[rows].reshape(len(rows), -1).astype(np.float32), d.target[rows].astype(str))
    return root / "train", root / "test", out


def test_widen_gives_the_narrow_heads_probabilities():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 12)).astype(np.float32)
    y = (X[:, 9] + X[:, 10] > 0).astype(int) + (X[:, 11] > 1)
    cols = slice(8, 12)
    narrow = Pipeline([("scaler", StandardScaler()), ("clf", LogisticRegression(C=0.5))]).fit(X[:, cols], y)
    wide = widen(narrow, cols, 12)
    Z = rng.normal(size=(30, 12)).astype(np.float32) * 3
    np.testing.assert_allclose(wide.predict_proba(Z), narrow.predict_proba(Z[:, cols]), rtol=1e-6, atol=1e-9)
    assert last_segment({"name": "multi", "segments": [{"start": 0, "stop": 8}, {"start": 8, "stop": 12}]}) == cols
    assert last_segment({"name": "last"}) is None and last_segment(None) is None


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    work = tmp_path_factory.mktemp("digits")
    train, test, raw = digits_folders(work)
    t = extract(train, out=work / "train.featx.parquet")  # no backbone, no features: the defaults
    return work, train, test, raw, t


def test_extract_defaults_to_multi_features(digits):
    *_, t = digits
    assert t.backbone.meta["features"]["name"] == "multi" and t.table.X.shape == (200, 4880)
    assert last_segment(t.backbone.meta["features"]) == slice(3600, 4880)


def test_the_default_flow_beats_raw_pixels_on_digits(digits):
    from featx.heads.fit import fit_head
    from featx.predict import predict

    work, _, test, raw, _ = digits
    r = fit_table(work / "train.featx.parquet", out=work / "head.featx")
    rep = r.report
    assert rep["segment"] in ("all", "last") and set(rep["segment_cv"]) == {"all", "last"}
    best = max(rep["segment_cv"], key=lambda k: (rep["segment_cv"][k], k == "all"))
    assert rep["segment"] == best
    # accuracy of the labels themselves, as evaluate measures it: no abstention for "unknown"
    pred = predict(r.head_file, [test], unknown=False)
    truth = [p.split("/")[-2] for p in pred.files]
    featx_acc = float(np.mean(np.array(pred.labels) == np.array(truth)))
    (Xtr, ytr), (Xte, yte) = raw["train"], raw["test"]
    pipe, rep_raw = fit_head(Xtr, ytr, C="auto")
    raw_acc = float(np.mean(np.asarray(rep_raw["classes"])[pipe.predict(Xte)] == yte))
    assert featx_acc > raw_acc, (featx_acc, raw_acc)
    assert featx_acc >= 0.9


def test_segment_last_is_a_head_on_the_last_segment_alone(digits):
    from featx.embed.table import read_table
    from featx.heads.fit import fit_head

    work, *_ = digits
    r = fit_table(work / "train.featx.parquet", out=work / "last.joblib", segment="last", C=1.0)
    assert r.report["segment"] == "last" and r.report["dim"] == 4880 and r.report["segment_dim"] == 1280
    t = read_table(work / "train.featx.parquet")
    narrow, _ = fit_head(t.X[:, 3600:], t.labels, C=1.0)
    h = load_head(r.head_file)
    np.testing.assert_allclose(h.pipeline.predict_proba(t.X), narrow.predict_proba(t.X[:, 3600:]), atol=1e-6)


def test_segment_last_needs_a_multi_table(lite0, tmp_path, image_folder):
    extract(image_folder, lite0, out=tmp_path / "t.featx.parquet")
    with pytest.raises(FeatXError, match="--segment last needs a logreg head on a multi table"):
        fit_table(tmp_path / "t.featx.parquet", out=tmp_path / "h.joblib", segment="last", C=1.0)
    r = fit_table(tmp_path / "t.featx.parquet", out=tmp_path / "h.joblib", C=1.0)
    assert "segment" not in r.report
