"""The feature recipe is a typed field of model.json's Sidecar, checked once when it is read."""

from __future__ import annotations

import json

import pytest

from featx.backbones.artifact import Sidecar, SidecarError
from featx.backbones.cards import get_card


def _sidecar(**more) -> dict:
    pre = get_card("efficientnet_lite0").preprocess.to_dict()
    return {"name": "x", "dim": 8, "preprocess": pre, "fingerprint": "f" * 16, "torch_version": "2", **more}


def test_no_record_is_last():
    side = Sidecar.from_dict(_sidecar())
    assert side.features is None and side.feature_recipe == "last" and side.feature_version is None
    assert "features" not in side.to_dict()


def test_a_multi_record_is_typed_not_extra_and_written_back_in_place():
    rec = {"name": "multi", "version": 2, "dim": 8, "segments": []}
    d = _sidecar(features=rec)
    side = Sidecar.from_dict(d)
    assert side.feature_recipe == "multi" and side.feature_version == 2
    assert "features" not in side.extra and side.features == rec
    out = side.to_dict()
    assert out["features"] == rec
    # the record sits where it did: after the provenance featx keeps, before the typed keys
    assert list(out).index("features") == list(out).index("torch_version") + 1


@pytest.mark.parametrize("bad, message", [
    ({"name": "everything"}, r"'features.name' must be one of last, multi, got 'everything'"),
    ("multi", r"'features' must be dict, got str"),
])
def test_a_bad_record_is_refused_naming_the_file(tmp_path, bad, message):
    p = tmp_path / "model.json"
    p.write_text(json.dumps(_sidecar(features=bad)))
    with pytest.raises(SidecarError, match=message):
        Sidecar.read(p)
