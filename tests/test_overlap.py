"""Test metrics that are test metrics: evaluate finds the images a head was trained on.

Real photos, the real default backbone: fit-head records its training rows' content keys
in the head; evaluate counts exact training images and near copies (a re-encoded one),
reports the metrics on the disjoint part too, and the head's card keeps one labelled
result per evaluation set. fit-head warns when the table is a test split.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from featx.evaluate import evaluate
from featx.extract import extract
from featx.fit_table import fit_table
from featx.heads.headfile import TRAIN_KEYS, key_digests, load_head, save_head
from featx.modelcard import head_card_path

from .helpers import make_image_folder, photos, run_cli


@pytest.fixture(scope="module")
def fitted(lite0, tmp_path_factory):
    work = tmp_path_factory.mktemp("overlap")
    train = make_image_folder(work / "data" / "train", per_class=4)
    extract(train, out=work / "train.featx.parquet")
    r = fit_table(work / "train.featx.parquet", C=1.0, out=work / "head.featx")
    return work, train, r


def mixed_test_folder(root, train):
    """2 training images copied, 1 re-encoded (a near copy), 3 images the head never saw."""
    for c in ("cat", "thing"):
        (root / c).mkdir(parents=True)
    shutil.copy(train / "cat" / "cat_0.jpg", root / "cat" / "copy.jpg")
    shutil.copy(train / "thing" / "thing_1.png", root / "thing" / "copy.png")
    Image.open(train / "cat" / "cat_1.png").convert("RGB").save(root / "cat" / "reencoded.jpg", quality=97)
    p = photos()
    Image.fromarray(p["astronaut"]).save(root / "thing" / "astronaut.png")
    Image.fromarray(p["camera"]).save(root / "thing" / "camera.png")
    Image.fromarray(np.ascontiguousarray(p["chelsea"][::-1])).save(root / "cat" / "upside_down.png")
    return root


def test_the_head_records_its_training_keys(fitted):
    from featx.embed.table import read_table

    work, _, r = fitted
    h = load_head(r.head_file)
    keys = read_table(work / "train.featx.parquet").keys
    assert h.train_keys is not None and h.train_keys.dtype == np.uint64
    assert sorted(h.train_keys.tolist()) == sorted(set(key_digests(keys).tolist()))


def test_evaluating_the_training_folder_says_it_is_not_a_test(fitted, tmp_path):
    _, train, r = fitted
    ev = evaluate(r.head_file, train, out_dir=tmp_path / "ev")
    ov = ev.metrics["overlap"]
    assert ov["exact_checked"] and ov["exact"] == 8 and ov["images"] == 8 and ov["near"] == 0
    assert ev.metrics["held_out"] is False and ev.metrics["disjoint"] == {"n": 0}
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["overlap"]["exact"] == 8


def test_exact_and_near_copies_are_counted_and_the_rest_scored_apart(fitted, tmp_path):
    _, train, r = fitted
    test = mixed_test_folder(tmp_path / "test", train)
    ev = evaluate(r.head_file, test)
    m = ev.metrics
    ov = m["overlap"]
    assert (ov["exact"], ov["near"], ov["near_checked"]) == (2, 1, True), ov
    assert m["disjoint"]["n"] == 3 and m["held_out"] is False
    files = [p.rsplit("/", 1)[-1] for p in ev.prediction.files]
    keep = [f in ("astronaut.png", "camera.png", "upside_down.png") for f in files]
    right = np.array(ev.prediction.labels) == np.array(ev.prediction.true_labels)
    assert m["disjoint"]["accuracy"] == pytest.approx(right[keep].mean())


def test_a_head_without_keys_falls_back_to_its_table_and_says_when_it_cannot(fitted, tmp_path):
    _, train, r = fitted
    h = load_head(r.head_file)
    old = tmp_path / "old.joblib"  # a head as featx wrote them before: no training keys
    save_head(old, h.pipeline, h.classes, lite0_of(h), h.meta["train"])
    assert load_head(old).train_keys is None
    m = evaluate(old, train).metrics["overlap"]
    assert m["exact_checked"] and m["exact_by"] == "content keys of the training table" and m["exact"] == 8
    summary = dict(h.meta["train"], embeddings=str(tmp_path / "gone.featx.parquet"))
    save_head(old, h.pipeline, h.classes, lite0_of(h), summary)
    m = evaluate(old, train).metrics["overlap"]
    assert not m["exact_checked"] and not m["near_checked"]
    assert any("gone" in n for n in m["notes"]) and any("no training keys" in n for n in m["notes"])


def lite0_of(h):
    from featx.heads.headfile import head_backbone

    return head_backbone(h)


def test_the_card_keeps_one_labelled_result_per_set(fitted, tmp_path):
    _, train, r = fitted
    test = mixed_test_folder(tmp_path / "test", train)
    clean = tmp_path / "clean"
    for c, name in (("thing", "astronaut.png"), ("thing", "camera.png"), ("cat", "upside_down.png")):
        (clean / c).mkdir(parents=True, exist_ok=True)
        shutil.copy(test / c / name, clean / c / name)
    for root in (train, test, clean, test):  # the second evaluation of `test` replaces its first
        evaluate(r.head_file, root, out_dir=tmp_path / f"{root.name}.eval", force=True)
    text = head_card_path(r.head_file).read_text(encoding="utf-8")
    evals = text.split("\n## Evaluations\n", 1)[1].split("\n## ", 1)[0]
    heads = [line for line in evals.splitlines() if line.startswith("### ")]
    assert heads == [f"### {train}", f"### {clean}", f"### {test}"]
    blocks = dict(zip(heads, evals.split("\n### ")[1:], strict=True))
    assert "**Not a held-out test set**: 8 of its 8 images are training rows" in blocks[f"### {train}"]
    assert "**Not a held-out test set**: 2 of its 6 images" in blocks[f"### {test}"]
    assert "| metric | all 6 images | 3 disjoint from training |" in blocks[f"### {test}"]
    assert "**Held-out test set**: none of its 3 images is a training row" in blocks[f"### {clean}"]
    assert text.count("## Evaluations") == 1


def test_the_cli_prints_the_overlap_beside_the_numbers(fitted, tmp_path, monkeypatch):
    _, train, r = fitted
    monkeypatch.chdir(tmp_path)
    out = run_cli("evaluate", str(r.head_file), str(train), "-q").output
    assert "8 images of 2 classes" in out
    assert "NOT a held-out test: 8 of 8 images are training rows of the head" in out
    assert "no image is disjoint from training" in out


def test_fit_head_warns_when_the_table_is_a_test_split(lite0, tmp_path):
    test = make_image_folder(tmp_path / "data" / "test", per_class=2)
    extract(test, out=tmp_path / "test.featx.parquet")
    r = fit_table(tmp_path / "test.featx.parquet", C=1.0, out=tmp_path / "head.featx")
    assert any("a test or validation split by its name" in w and str(test) in w for w in r.warnings)
    train = make_image_folder(tmp_path / "data" / "train", per_class=2)
    extract(train, out=tmp_path / "train.featx.parquet")
    r = fit_table(tmp_path / "train.featx.parquet", C=1.0, out=tmp_path / "h2.joblib")
    assert r.warnings == []


def test_the_keys_array_is_data_an_old_featx_ignores(fitted):
    from featx.heads.headfile import _arrays, read_header

    _, _, r = fitted
    header, payload, p = read_header(r.head_file)
    assert TRAIN_KEYS in _arrays(p, payload)
    assert header["train"]["n_train"] == 8
