"""Decode + preprocess: formats, modes, orientation, bombs, draft mode, scanning."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from featx.backbones.cards import Preprocess
from featx.embed.images import decode, load_image
from featx.embed.scan import scan
from featx.errors import FeatXError, ImageError

SPEC = Preprocess(input_size=64, resize_size=72, interpolation="bilinear")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


@pytest.fixture
def rgb():
    import skimage.data

    return Image.fromarray(skimage.data.chelsea())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_formats_decode_to_uint8_rgb(rgb, fmt):
    out = load_image(encode(rgb, fmt), SPEC)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_output_is_centre_crop_of_resized(rgb):
    """Resize shorter side to 72, centre-crop 64: compare with a direct PIL computation."""
    out = load_image(rgb, SPEC).astype(int)
    w, h = rgb.size
    s = 72 / min(w, h)
    big = rgb.resize((round(w * s), round(h * s)), Image.BILINEAR)
    left, top = (big.width - 64) // 2, (big.height - 64) // 2
    ref = np.asarray(big.crop((left, top, left + 64, top + 64))).astype(int)
    assert np.abs(out - ref).mean() < 4  # same region and scale; resampling grids differ by < 1 px


def test_exif_rotation_equals_upright(rgb):
    upright = load_image(encode(rgb, "PNG"), SPEC)
    rotated = rgb.transpose(Image.Transpose.ROTATE_90)  # stored sideways...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...with the tag that says "rotate 90 CW to display"
    data = encode(rotated, "PNG", exif=exif.tobytes())
    np.testing.assert_array_equal(load_image(data, SPEC), upright)


def test_modes(rgb):
    gray = rgb.convert("L")
    g = load_image(encode(gray, "PNG"), SPEC)
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    # 16-bit grayscale scales to 8 bits, does not saturate
    a16 = (np.asarray(gray, dtype=np.uint16) * 257)
    i16 = load_image(encode(Image.fromarray(a16), "PNG"), SPEC)
    np.testing.assert_allclose(i16.astype(int), g.astype(int), atol=1)
    # CMYK JPEG comes back close to the RGB original
    cmyk = load_image(encode(rgb.convert("CMYK"), "JPEG", quality=95), SPEC)
    ref = load_image(encode(rgb, "JPEG", quality=95), SPEC)
    assert np.abs(cmyk.astype(int) - ref.astype(int)).mean() < 8
    # palette with transparency and RGBA composite onto white
    rgba = rgb.convert("RGBA")
    rgba.putalpha(0)
    assert (load_image(encode(rgba, "PNG"), SPEC) == 255).all()
    pal = rgb.convert("P")
    assert load_image(encode(pal, "PNG", transparency=0), SPEC).shape == (64, 64, 3)
    la = gray.convert("LA")
    assert load_image(encode(la, "PNG"), SPEC).shape == (64, 64, 3)


def test_arrays_and_tiny_and_strips():
    assert load_image(np.zeros((28, 28), np.uint8), SPEC).shape == (64, 64, 3)
    assert load_image(np.zeros((1, 1, 3), np.uint8), SPEC).shape == (64, 64, 3)
    assert load_image(np.zeros((10, 5000, 3), np.uint8), SPEC).shape == (64, 64, 3)
    with pytest.raises(ImageError, match="dtype"):
        load_image(np.zeros((8, 8), np.float32), SPEC)


def test_bad_bytes_raise_image_error():
    with pytest.raises(ImageError, match="not an image"):
        decode(b"hello world, not an image", "x.jpg")
    good = encode(Image.new("RGB", (300, 200), (10, 200, 30)), "JPEG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode(good[: len(good) // 2], "half.jpg")
    png = encode(Image.new("RGB", (300, 200), (10, 200, 30)), "PNG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode(png[: len(png) // 2], "half.png")


def test_decompression_bomb_refused():
    # a valid PNG header claiming 100000 x 100000 pixels in a few bytes
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    with pytest.raises(ImageError, match=r"too large|bomb"):
        decode(data, "bomb.png")


def test_jpeg_draft_decodes_smaller_but_same_picture(rgb):
    big = rgb.resize((rgb.width * 6, rgb.height * 6), Image.BICUBIC)
    data = encode(big, "JPEG", quality=92)
    spec = Preprocess(input_size=224, resize_size=256)
    img = decode(data, draft_size=256)
    assert min(img.size) >= 256 and img.width < big.width  # reduced, still >= target
    fast = load_image(data, spec, draft=True).astype(int)
    full = load_image(data, spec, draft=False).astype(int)
    assert np.abs(fast - full).mean() < 3


def test_scan_layouts(tmp_path):
    img = Image.new("RGB", (8, 8))
    for rel in ["a/1.JPG", "a/sub/2.png", "b/3.webp", "b/.hidden.png", "b/notes.txt", ".DS_Store"]:
        p = tmp_path / "lab" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p, "PNG") if rel.endswith((".JPG", ".png", ".webp")) else p.write_text("x")
    r = scan(tmp_path / "lab")
    assert [(i.path, i.label) for i in r.items] == [("a/1.JPG", "a"), ("a/sub/2.png", "a"), ("b/3.webp", "b")]
    assert r.classes == ["a", "b"]
    flat = tmp_path / "flat"
    flat.mkdir()
    img.save(flat / "x.png")
    assert scan(flat).items[0].label is None and not scan(flat).classes
    img.save(tmp_path / "lab" / "top.png")
    with pytest.raises(FeatXError, match="mixes images"):
        scan(tmp_path / "lab")
    with pytest.raises(FeatXError, match="no such"):
        scan(tmp_path / "nope")


def test_scan_survives_symlink_loop(tmp_path):
    (tmp_path / "d" / "c").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "c" / "x.png")
    os.symlink(tmp_path / "d", tmp_path / "d" / "c" / "loop")
    r = scan(tmp_path / "d")
    assert [i.path for i in r.items] == ["c/x.png"]
    assert any("loop" in why for _, why in r.skipped)
