"""The one-file classifier without featx: docs/heads.md's Pillow + numpy recipe, bare ONNX Runtime.

The code under test is read from docs/heads.md itself, so the page cannot drift from
what featx does: its pixels must equal ``featx.embed.images.load_image``'s exactly,
and its labels must equal ``featx predict``'s on camera-size photos.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from featx.cli import main
from featx.embed.images import load_image

from .helpers import make_image_folder, photos

DOC = Path(__file__).resolve().parents[1] / "docs" / "heads.md"
# (name, size) of the test photos: camera sizes, landscape and portrait, and a few small
# ones, so that the draft takes every branch (1/8, 1/4, 1/2, none)
CAMERA = [("chelsea", (4032, 3024)), ("coffee", (3024, 4032)), ("astronaut", (3000, 3000)),
          ("rocket", (1920, 1080)), ("cat", (1200, 900)), ("camera", (800, 600)),
          ("chelsea", (640, 480)), ("coffee", (300, 200))]


def reference_code() -> dict:
    """Run the ```python block of docs/heads.md that defines featx_pixels; return its names."""
    text = DOC.read_text()
    section = text.split("## Using the ONNX file without featx", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    code = next(b for b in blocks if "def featx_pixels" in b)
    names: dict = {}
    exec(compile(code, f"{DOC}:featx_pixels", "exec"), names)
    return names


@pytest.fixture(scope="module")
def camera_photos(tmp_path_factory) -> list[Path]:
    """skimage photos saved as camera-size JPEGs (one with an EXIF rotation), plus a PNG with alpha."""
    root = tmp_path_factory.mktemp("camera") / "photos"
    root.mkdir()
    p = photos()
    files = []
    for i, (name, size) in enumerate(CAMERA):
        img = Image.fromarray(p[name]).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        f = root / f"{i}_{name}.jpg"
        exif = Image.Exif()
        if i == 1:
            exif[0x0112] = 6  # orientation: rotate 90 degrees, as phones write portrait shots
        img.save(f, quality=92, exif=exif.tobytes())
        files.append(f)
    rgba = Image.fromarray(p["astronaut"]).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 512, dtype=np.uint8), (512, 1))))
    rgba.save(root / "alpha.png")
    files.append(root / "alpha.png")
    return files


@pytest.fixture(scope="module")
def classifier(lite0, tmp_path_factory) -> tuple[Path, Path]:
    """A head on real photos (cats vs things), and its one-file ONNX classifier."""
    tmp = tmp_path_factory.mktemp("ref")
    data = make_image_folder(tmp / "train", per_class=6)
    runner = CliRunner()
    for args in (["extract", str(data), "--out", str(tmp / "train.featx.parquet"), "-q"],
                 ["fit-head", "--embeddings", str(tmp / "train.featx.parquet"), "--C", "1.0",
                  "--out", str(tmp / "head.featx")],
                 ["export-classifier", str(tmp / "head.featx"), "--out", str(tmp / "classifier.onnx")]):
        r = runner.invoke(main, args)
        assert r.exit_code == 0, r.output
    return tmp / "head.featx", tmp / "classifier.onnx"


def test_reference_pixels_are_featx_pixels(camera_photos, lite0):
    featx_pixels = reference_code()["featx_pixels"]
    spec = lite0.preprocess
    for f in camera_photos:
        ours = load_image(f, spec)
        ref = featx_pixels(f, spec.input_size, spec.resize_size, spec.interpolation)
        assert ref.dtype == np.uint8 and ref.shape == ours.shape == (224, 224, 3)
        np.testing.assert_array_equal(ref, ours, err_msg=str(f))
    # the other cards' sizes and interpolations too
    from featx.backbones.cards import get_card

    for name in ("efficientnet_lite1", "efficientnet_lite2", "resnet50"):
        s = get_card(name).preprocess
        for f in camera_photos[:3]:
            np.testing.assert_array_equal(
                featx_pixels(f, s.input_size, s.resize_size, s.interpolation), load_image(f, s))


def test_why_the_recipe_matters(camera_photos, lite0):
    """A textbook resize-then-crop gives other pixels on camera JPEGs: the recipe is not optional."""
    spec = lite0.preprocess
    diffs = []
    for f in camera_photos[:4]:
        img = Image.open(f).convert("RGB")
        w, h = img.size
        s = spec.resize_size / min(w, h)
        img = img.resize((round(w * s), round(h * s)), Image.Resampling[spec.interpolation.upper()])
        left, top = (img.width - spec.input_size) // 2, (img.height - spec.input_size) // 2
        naive = np.asarray(img.crop((left, top, left + spec.input_size, top + spec.input_size)))
        diffs.append(int(np.abs(naive.astype(int) - load_image(f, spec)).max()))
    assert min(diffs) > 0, diffs


def test_bare_onnxruntime_with_the_recipe_agrees_with_featx_predict(classifier, camera_photos):
    head, onnx_path = classifier
    labels, proba = reference_code()["classify"](onnx_path, camera_photos)
    # --no-unknown: the ONNX file labels every image; featx would leave an unknown one unlabelled
    r = CliRunner().invoke(main, ["predict", str(head), *map(str, camera_photos), "--json", "-q",
                                  "--no-unknown"])
    assert r.exit_code == 0, r.output
    pred = {p["path"]: p for p in json.loads(r.output)["predictions"]}
    expected = [pred[str(f)]["label"] for f in camera_photos]
    assert [str(v) for v in labels] == expected
    assert set(expected) == {"cat", "thing"}  # both classes occur: the check can fail
    # probabilities as featx computes them, up to float32 noise of another session
    top = [pred[str(f)]["probability"] for f in camera_photos]
    np.testing.assert_allclose(proba.max(1), top, atol=1e-4)


def test_metadata_states_the_recipe(classifier, lite0):
    from featx.heads.onnx_classifier import preprocess_recipe

    _, onnx_path = classifier
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    recipe = meta["featx.preprocess_recipe"]
    assert recipe == preprocess_recipe(lite0.preprocess)
    for fact in ("JPEG", "r = min(w, h) / 256 >= 2", "img.draft('RGB', (ceil(w / r), ceil(h / r)))",
                 "exif_transpose", "pasted on white", "s = 256 / min(w, h)", "ONE pass",
                 "box=", lite0.preprocess.interpolation, "left + 224 / s"):
        assert fact in recipe, fact
    assert json.loads(meta["featx.preprocess"])["resize_size"] == 256
    import PIL

    assert meta["featx.pillow_version"] == PIL.__version__
