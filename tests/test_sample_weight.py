"""FeatXClassifier.fit(X, y, sample_weight=...): weights reach the scaler and the head (issue 27, 15)."""

from __future__ import annotations

import numpy as np
import pytest

from featx import FeatXClassifier
from featx.estimators import ImageInputError

from .helpers import make_image_folder


def _paths(root):
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [str(p) for p in files], np.array([p.parent.name for p in files])


def test_zero_weight_is_the_same_as_leaving_the_image_out(lite0, tmp_path):
    X, y = _paths(make_image_folder(tmp_path / "d", per_class=4))
    w = np.ones(len(y))
    w[[0, 5]] = 0.0  # one image of each class weighs nothing
    keep = w > 0
    weighted = FeatXClassifier(C=1.0).fit(X, y, sample_weight=w)
    dropped = FeatXClassifier(C=1.0).fit([x for x, k in zip(X, keep, strict=True) if k], y[keep])
    np.testing.assert_allclose(weighted.predict_proba(X), dropped.predict_proba(X), atol=1e-5)
    assert weighted.report_["sample_weight"] is True
    heavy = FeatXClassifier(C=1.0).fit(X, y, sample_weight=np.where(np.arange(len(y)) == 1, 50.0, 1.0))
    assert not np.allclose(heavy.predict_proba(X), FeatXClassifier(C=1.0).fit(X, y).predict_proba(X))


def test_bad_weights_are_refused(lite0, tmp_path):
    X, y = _paths(make_image_folder(tmp_path / "d", per_class=2))
    with pytest.raises(ImageInputError, match=r"sample_weight.shape == \(3,\), expected \(4,\)"):
        FeatXClassifier(C=1.0).fit(X, y, sample_weight=[1, 1, 1])
    with pytest.raises(ImageInputError, match="non-negative"):
        FeatXClassifier(C=1.0).fit(X, y, sample_weight=[1, -1, 1, 1])
