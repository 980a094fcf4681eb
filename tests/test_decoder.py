"""The JPEG decoder as a preprocessing setting: Pillow (default) vs simplejpeg.

What must hold: the two decoders give the same verdict on every hostile file and the
same picture on real photos (ImageNet top-1 unchanged, embeddings cosine >= 0.99), the
decoder is part of the fingerprint (stores and heads never mix), and everything written
before the decoder was a choice stays valid under ``decoder="pillow"``.
"""

import io
import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from featx.backbones.artifact import fingerprint_of, load_export, with_decoder
from featx.backbones.cards import Preprocess
from featx.embed.images import decode, load_image
from featx.errors import FeatXError, ImageError
from featx.extract import extract

from .helpers import make_image_folder, photos
from .test_bad_inputs import build_corpus

SPEC = Preprocess(input_size=224, resize_size=256, interpolation="bicubic", decoder="simplejpeg")
PILLOW = SPEC.with_decoder("pillow")


def jpeg(img: Image.Image | np.ndarray, **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    b = io.BytesIO()
    img.save(b, "JPEG", **kw)
    return b.getvalue()


def camera_jpeg(a: np.ndarray, scale: float = 4.0, **kw) -> bytes:
    """A real photo at camera size (skimage's are ~512 px): upscaled, like bench/extract.py."""
    img = Image.fromarray(a)
    return jpeg(img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR),
                quality=90, **kw)


def outcome(data: bytes, spec: Preprocess, name: str = "f"):
    """What featx makes of a file: its pixels, or the ImageError's reason."""
    try:
        return load_image(data, spec, name=name)
    except ImageError as e:
        return e.reason


def assert_same_outcome(data: bytes, spec: Preprocess = SPEC, name: str = "f") -> None:
    fast, slow = outcome(data, spec, name), outcome(data, spec.with_decoder("pillow"), name)
    if isinstance(slow, str) or isinstance(fast, str):
        assert fast == slow, (name, fast if isinstance(fast, str) else "decoded",
                              slow if isinstance(slow, str) else "decoded")
    else:
        assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 1.0, name


@pytest.fixture
def calls(monkeypatch):
    """Counts simplejpeg's decodes (the real function runs), so a test can tell which path ran."""
    import simplejpeg

    n = {"decode": 0}
    real = simplejpeg.decode_jpeg

    def counting(*a, **kw):
        n["decode"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(simplejpeg, "decode_jpeg", counting)
    return n


def test_default_is_pillow_and_simplejpeg_is_selectable():
    assert Preprocess().decoder == "pillow"
    assert Preprocess.from_dict({"input_size": 224}).decoder == "pillow"
    assert Preprocess(decoder="simplejpeg").decoder == "simplejpeg"
    with pytest.raises(FeatXError, match="decoder 'turbo' is not one of simplejpeg, pillow"):
        Preprocess(decoder="turbo")


def test_pillow_spec_hashes_as_before_and_simplejpeg_does_not():
    """The canonical string of a Pillow spec is byte for byte the one featx hashed before the
    decoder was a choice, so its stores and heads stay valid; simplejpeg's differs."""
    before = ('{"input_size":224,"interpolation":"bicubic","mean":[123.675,116.28,103.53],'
              '"resize_size":256,"std":[58.395,57.12,57.375]}')
    assert PILLOW.canonical() == before
    assert '"decoder":"simplejpeg"' in SPEC.canonical()
    assert fingerprint_of(b"onnx", PILLOW) != fingerprint_of(b"onnx", SPEC)
    # a spec featx stored before (sidecar, head file) has no decoder key: it was Pillow's
    old = json.loads(before)
    assert Preprocess.from_dict(old, stored=True) == PILLOW
    assert Preprocess.from_dict(SPEC.to_dict(), stored=True) == SPEC


def test_old_export_without_decoder_still_loads_as_pillow(lite0, tmp_path):
    """An export directory written before featx had decoders: same fingerprint, Pillow."""
    d = tmp_path / "old-export"
    shutil.copytree(lite0.onnx_path.parent, d)
    meta = json.loads((d / "model.json").read_text())
    meta["preprocess"].pop("decoder", None)  # a Pillow spec is written without it anyway
    old_pre = Preprocess.from_dict(meta["preprocess"], stored=True)
    meta["fingerprint"] = fingerprint_of((d / "model.onnx").read_bytes(), old_pre)
    (d / "model.json").write_text(json.dumps(meta))
    bb = load_export(d)  # no "modified after export"
    assert bb.preprocess.decoder == "pillow"
    assert with_decoder(lite0, "pillow").fingerprint == bb.fingerprint


@pytest.mark.parametrize("case", ["camera", "progressive", "grey", "444", "odd-size", "small", "no-draft"])
def test_simplejpeg_decodes_real_photos_like_pillow(case, calls):
    a = photos()["chelsea"]
    data = {
        "camera": lambda: camera_jpeg(a),
        "progressive": lambda: camera_jpeg(a, progressive=True),
        "grey": lambda: camera_jpeg(np.asarray(Image.fromarray(a).convert("L"))),
        "444": lambda: camera_jpeg(a, subsampling=0),
        "odd-size": lambda: camera_jpeg(a, scale=2.97),
        "small": lambda: jpeg(a[:200, :150]),
        "no-draft": lambda: camera_jpeg(a, scale=1.5),
    }[case]()
    draft = case != "no-draft"
    fast = load_image(data, SPEC, draft=draft).astype(int)
    assert calls["decode"] == 1  # the fast path ran, no fallback
    slow = load_image(data, PILLOW, draft=draft).astype(int)
    assert calls["decode"] == 1
    assert np.abs(fast - slow).mean() < 1.0 and np.abs(fast - slow).max() <= 16


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_upright(orientation, calls):
    a = photos()["astronaut"][:, 64:]  # not square, so a wrong rotation cannot pass
    upright = Image.fromarray(a)
    # store the picture as a camera would: transformed so that the tag's transpose undoes it
    inverse = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
               6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_270}
    stored = upright.transpose(inverse[orientation]) if orientation in inverse else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(stored, quality=95, exif=exif.tobytes())
    small = Preprocess(input_size=96, resize_size=110)
    img = decode(data, draft_size=None, decoder="simplejpeg")
    assert calls["decode"] == 1 and img.size == upright.size
    ref = load_image(jpeg(upright, quality=95), small).astype(int)
    assert np.abs(load_image(data, small).astype(int) - ref).mean() < 3
    assert_same_outcome(data, small)


def test_hostile_corpus_same_verdicts_as_pillow(tmp_path, calls):
    """tests/test_bad_inputs.py's corpus: every file embedded or refused exactly as Pillow did."""
    embedded, skipped = build_corpus(tmp_path / "bad")
    for name in sorted(embedded | set(skipped)):
        assert_same_outcome((tmp_path / "bad" / name).read_bytes(), name=name)
    cmyk = (tmp_path / "bad" / "cmyk.jpg").read_bytes()
    n = calls["decode"]
    load_image(cmyk, SPEC)
    assert calls["decode"] == n  # CMYK is Pillow's: simplejpeg never sees it


def test_damaged_jpegs_same_verdicts_as_pillow(calls):
    """Truncated anywhere, missing only the end marker, corrupt entropy data, a bomb header."""
    data = camera_jpeg(photos()["coffee"], scale=2.0)
    for cut in (0.05, 0.3, 0.5, 0.9, 0.999):
        assert_same_outcome(data[: int(len(data) * cut)], name=f"cut{cut}")
    assert_same_outcome(data[:-2], name="no-EOI")  # libjpeg warns; strict hands it to Pillow
    flipped = bytearray(data)
    for i in range(len(data) // 2, len(data) - 100, 997):
        flipped[i] ^= 0x55
    assert_same_outcome(bytes(flipped), name="corrupt-middle")
    # a baseline JPEG header claiming 60000 x 60000 pixels: refused before any decoding
    sof = data.index(b"\xff\xc0")
    bomb = bytearray(data)
    bomb[sof + 5:sof + 9] = (60000).to_bytes(2, "big") * 2
    n = calls["decode"]
    with pytest.raises(ImageError, match=r"too large|bomb"):
        load_image(bytes(bomb), SPEC, name="bomb.jpg")
    assert calls["decode"] == n
    assert_same_outcome(bytes(bomb), name="bomb.jpg")
    # progressive and truncated: Pillow's verdict too
    prog = camera_jpeg(photos()["rocket"], scale=2.0, progressive=True)
    assert_same_outcome(prog[: len(prog) * 2 // 3], name="progressive-cut")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), flips=st.integers(0, 8), cut=st.floats(0.02, 1.0))
def test_fuzzed_jpegs_same_verdicts_as_pillow(seed, flips, cut):
    rng = np.random.default_rng(seed)
    a = photos()["cat"][rng.integers(0, 100):, rng.integers(0, 100):]
    data = bytearray(jpeg(a, quality=int(rng.integers(50, 98)), progressive=bool(seed % 2)))
    for i in rng.integers(0, len(data), flips):
        data[i] = int(rng.integers(0, 256))
    data = bytes(data[: max(1, int(len(data) * cut))])
    assert_same_outcome(data, Preprocess(input_size=64, resize_size=72), name="fuzz")


def test_png_and_webp_never_reach_simplejpeg(calls):
    a = photos()["camera"]  # a grey photo
    for fmt in ("PNG", "WEBP"):
        b = io.BytesIO()
        Image.fromarray(a).save(b, fmt)
        assert_same_outcome(b.getvalue(), name=fmt)
    assert calls["decode"] == 0


def test_accuracy_guard_imagenet_top1_and_cosine(lite0):
    """The default backbone on camera-size JPEGs of the bundled photos: the same ImageNet
    top-1 through either decoder, and every embedding within cosine 0.99 of Pillow's."""
    torch = pytest.importorskip("torch")
    from featx.backbones.cards import get_card
    from featx.backbones.zoo import build
    from featx.embed.runtime import Encoder

    _, classifier, _ = build(get_card("efficientnet_lite0"))
    fast_bb, slow_bb = with_decoder(lite0, "simplejpeg"), with_decoder(lite0, "pillow")
    files = [camera_jpeg(a) for a in photos().values()]
    enc = Encoder(lite0, device="cpu")
    fast = enc(np.stack([load_image(f, fast_bb.preprocess) for f in files]))
    slow = enc(np.stack([load_image(f, slow_bb.preprocess) for f in files]))
    cos = (fast * slow).sum(1) / np.linalg.norm(fast, axis=1) / np.linalg.norm(slow, axis=1)
    assert cos.min() >= 0.99, cos
    with torch.no_grad():
        top1 = [classifier(torch.from_numpy(e)).argmax(1).tolist() for e in (fast, slow)]
    assert top1[0] == top1[1]


def test_two_decoders_never_share_store_entries(tmp_path, lite0):
    """Same files, same store directory: a Pillow run finds nothing of a simplejpeg run's."""
    data = make_image_folder(tmp_path / "data")
    kw = dict(store=tmp_path / "store", device="cpu", write=False)
    a = extract(data, lite0, decoder="simplejpeg", **kw)
    b = extract(data, lite0, decoder="pillow", **kw)
    assert a.stats.embedded == b.stats.embedded == 8 and b.stats.cached == 0
    assert a.backbone.fingerprint != b.backbone.fingerprint
    assert {p.name for p in (tmp_path / "store").iterdir() if p.is_dir()} >= {
        a.backbone.fingerprint, b.backbone.fingerprint}
    again = extract(data, lite0, **kw)  # the backbone's own decoder: Pillow's entries
    assert again.stats.cached == 8 and again.backbone.fingerprint == b.backbone.fingerprint


def test_head_keeps_the_decoder_it_was_fitted_with(tmp_path, lite0):
    """A head fitted on simplejpeg embeddings runs its backbone through simplejpeg, even when
    the backbone is given by name (whose own decoder is Pillow)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from featx.heads.headfile import head_backbone, load_head, save_head

    data = make_image_folder(tmp_path / "data")
    r = extract(data, lite0, decoder="simplejpeg", store=tmp_path / "s", device="cpu", write=False)
    pipe = make_pipeline(LogisticRegression(max_iter=200)).fit(r.table.X, r.table.labels)
    path = save_head(tmp_path / "head.featx", pipe, sorted(set(r.table.labels)), r.backbone, {})
    head = load_head(path)
    for bb in (head_backbone(head), head_backbone(head, override=lite0)):
        assert bb.preprocess.decoder == "simplejpeg" and bb.fingerprint == r.backbone.fingerprint


def test_cli_decoder_option(tmp_path, lite0):
    from click.testing import CliRunner

    from featx.cli import main

    data = make_image_folder(tmp_path / "data", per_class=2)
    args = ["extract", str(data), "--store", str(tmp_path / "s"), "--device", "cpu", "--json", "-q"]
    first = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a.parquet"), "--decoder", "simplejpeg"])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b.parquet")])
    assert second.exit_code == 0, second.output
    assert json.loads(first.output)["embedded"] == json.loads(second.output)["embedded"] == 4
    bad = CliRunner().invoke(main, [*args, "--decoder", "turbo"])
    assert bad.exit_code == 2 and "turbo" in bad.output
