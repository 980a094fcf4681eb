"""One helper finds the backbone a head, table or estimator was made with, and checks its
fingerprint (featx.backbones.resolve.recorded_backbone / check_fingerprint): the three
refusals say the same thing, and a broken recorded export gives way to the card."""

from __future__ import annotations

import json
import shutil

import pytest
from sklearn.linear_model import LogisticRegression

from featx.backbones.artifact import fingerprint_of, load_export
from featx.backbones.cards import Preprocess
from featx.backbones.resolve import table_backbone
from featx.errors import MismatchError
from featx.estimators import FeatXClassifier
from featx.extract import extract
from featx.heads.headfile import head_backbone, load_head, save_head

from .helpers import make_image_folder

SAME_WORDS = "Embeddings of different backbones are not comparable"


@pytest.fixture(scope="module")
def other(lite0, tmp_path_factory):
    """lite0's network with another interpolation: another fingerprint."""
    other = tmp_path_factory.mktemp("other") / "bb"
    shutil.copytree(lite0.onnx_path.parent, other)
    meta = json.loads((other / "model.json").read_text())
    meta["preprocess"]["interpolation"] = "bilinear"
    meta["fingerprint"] = fingerprint_of((other / "model.onnx").read_bytes(),
                                         Preprocess.from_dict(meta["preprocess"]))
    (other / "model.json").write_text(json.dumps(meta))
    bb = load_export(other)
    assert bb.fingerprint != lite0.fingerprint
    return bb


@pytest.fixture(scope="module")
def table(lite0, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t")
    return extract(make_image_folder(tmp / "data", per_class=2), lite0, out=tmp / "t.featx.parquet",
                   store=tmp / "s", device="cpu")


def _refusal(exc, lite0, other):
    msg = str(exc.value)
    assert lite0.fingerprint in msg and other.fingerprint in msg and SAME_WORDS in msg, msg
    return msg


def test_table_head_and_estimator_refuse_another_backbone_alike(lite0, other, table, tmp_path):
    t = table.table
    with pytest.raises(MismatchError) as e:
        table_backbone(t.meta, table.out, other)
    assert "was extracted with backbone" in _refusal(e, lite0, other)
    assert table_backbone(t.meta, table.out, None).fingerprint == lite0.fingerprint

    pipe = LogisticRegression(max_iter=200).fit(t.X, t.labels)
    head = load_head(save_head(tmp_path / "head.featx", pipe, sorted(set(t.labels)), lite0, {}))
    with pytest.raises(MismatchError) as e:
        head_backbone(head, override=other)
    assert "was trained on backbone" in _refusal(e, lite0, other)

    files = sorted(p for p in (table.out.parent / "data").rglob("*") if p.is_file())
    labels = [p.parent.name for p in files]
    clf = FeatXClassifier(backbone=str(lite0.onnx_path.parent), C=1.0, store=tmp_path / "s",
                          device="cpu").fit([str(p) for p in files], labels)
    clf.set_params(backbone=str(other.onnx_path.parent))
    with pytest.raises(MismatchError) as e:
        clf.predict([str(files[0])])
    assert "refit it" in _refusal(e, lite0, other)


def test_a_head_whose_export_is_broken_falls_back_to_its_card(lite0, table, tmp_path):
    """As a table always did: the card's export has the recorded fingerprint, so it is the same
    network (before, the head was refused with the broken directory's error)."""
    mine = tmp_path / "mine"
    shutil.copytree(lite0.onnx_path.parent, mine)
    t = table.table
    pipe = LogisticRegression(max_iter=200).fit(t.X, t.labels)
    head = load_head(save_head(tmp_path / "head.featx", pipe, sorted(set(t.labels)), load_export(mine), {}))
    assert head.backbone_dir == str(mine)
    with open(mine / "model.onnx", "ab") as f:
        f.write(b"tampered")
    assert head_backbone(head).fingerprint == lite0.fingerprint
