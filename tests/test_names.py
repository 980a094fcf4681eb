"""Names that say what things are (issue 24 item 7): the shared FileEmbedder is ``shared``
(no ``runtime()`` beside the module ``embed.runtime``), predict is a job that exports its own
names only, a head file is ``head.featx`` (earlier ``head.joblib`` still read), a head's
probabilities are its own methods."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

import featx.engines.files as files
import featx.predict as predict
from featx.heads.headfile import (
    HEAD_FILE,
    LEGACY_HEAD_FILE,
    HeadFileError,
    head_path,
    load_head,
    save_head,
)


def test_one_name_for_the_shared_embedder_and_predict_exports_its_own():
    assert not hasattr(files, "runtime") and "runtime" not in files.__all__
    assert predict.__all__ == ["PredictResult", "predict", "write_predictions"]
    for moved in ("array_key", "collect_files", "embed_arrays", "embed_paths", "runtime"):
        assert moved not in predict.__all__
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("featx.heads.proba")


@pytest.fixture
def head_args(lite0):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, lite0.dim)).astype(np.float32)
    y = np.array([0, 1] * 10)
    return LogisticRegression(max_iter=200).fit(X, y), ["a", "b"], lite0, X


def test_a_run_directory_holds_head_featx_and_an_earlier_head_joblib_is_read(tmp_path, head_args):
    pipe, classes, bb, X = head_args
    assert HEAD_FILE == "head.featx"
    new = tmp_path / "new"
    new.mkdir()
    assert save_head(new, pipe, classes, bb, {}) == new / "head.featx"
    assert head_path(new) == new / "head.featx"
    old = tmp_path / "old"
    save_head(old / LEGACY_HEAD_FILE, pipe, classes, bb, {})
    assert head_path(old) == old / "head.joblib"
    h = load_head(old)
    np.testing.assert_array_equal(h.proba(X), pipe.predict_proba(X))
    assert h.class_columns() == ["a", "b"]
    with pytest.raises(HeadFileError, match=r"\*\.featx, or \*\.joblib from earlier featx"):
        head_path(tmp_path / "empty-dir-that-is-not-there")


def test_both_names_in_a_directory_the_new_one_wins(tmp_path, head_args):
    pipe, classes, bb, _ = head_args
    save_head(tmp_path / LEGACY_HEAD_FILE, pipe, ["x", "y"], bb, {})
    save_head(tmp_path / HEAD_FILE, pipe, classes, bb, {})
    assert load_head(tmp_path).classes == classes
