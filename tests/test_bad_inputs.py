"""A hostile folder built by the test: every file is embedded correctly or skipped with a reason."""

import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from featx.backbones.cards import Preprocess
from featx.embed.images import load_image
from featx.embed.table import read_table
from featx.errors import ImageError
from featx.extract import extract

from .helpers import make_image_folder, unprivileged


def _png_bomb() -> bytes:
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def build_corpus(d):
    """(embedded: names expected in the table, skipped: name -> reason fragment)."""
    import skimage.data

    cat = Image.fromarray(skimage.data.chelsea())
    d.mkdir(parents=True, exist_ok=True)

    def save(name, img, fmt, **kw):
        b = io.BytesIO()
        img.save(b, fmt, **kw)
        (d / name).write_bytes(b.getvalue())
        return b.getvalue()

    jpg = save("ok.jpg", cat, "JPEG")
    png = save("ok.png", cat, "PNG")
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    (d / "truncated.png").write_bytes(png[: len(png) // 3])
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("hello, I am text")
    (d / "png-named.jpg").write_bytes(png)
    save("cmyk.jpg", cat.convert("CMYK"), "JPEG")
    save("gray16.png", Image.fromarray(np.asarray(cat.convert("L"), np.uint16) * 257), "PNG")
    save("palette-alpha.png", cat.convert("P"), "PNG", transparency=3)
    save("la.png", cat.convert("LA"), "PNG")
    save("gray.png", cat.convert("L"), "PNG")
    save("one-pixel.png", Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")
    save("strip.png", Image.new("RGB", (50000, 10), (50, 100, 150)), "PNG")
    (d / "bomb.png").write_bytes(_png_bomb())
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif-rotated.jpg", cat.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif.tobytes())
    frames = [cat.resize((64, 48)), Image.new("RGB", (64, 48), (0, 0, 255))]
    save("animated.gif", frames[0], "GIF", save_all=True, append_images=frames[1:])
    save("multipage.tiff", frames[0], "TIFF", save_all=True, append_images=frames[1:])
    save("ok.webp", cat, "WEBP")
    save("ünïcode name with spaces.jpg", cat, "JPEG")
    save(".hidden.jpg", cat, "JPEG")
    (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (d / "folder.jpg").mkdir()
    (d / "loop").mkdir()
    os.symlink(d, d / "loop" / "back")
    embedded = {"ok.jpg", "ok.png", "png-named.jpg", "cmyk.jpg", "gray16.png", "palette-alpha.png",
                "la.png", "gray.png", "one-pixel.png", "strip.png", "exif-rotated.jpg", "animated.gif",
                "multipage.tiff", "ok.webp", "ünïcode name with spaces.jpg"}
    skipped = {"truncated.jpg": "truncated", "truncated.png": "truncated", "zero.jpg": "empty",
               "text.jpg": "not an image", "bomb.png": "bomb"}
    return embedded, skipped


def test_hostile_folder(tmp_path, lite0):
    data = make_image_folder(tmp_path / "data")
    clean = extract(data, lite0, out=tmp_path / "clean.parquet", store=tmp_path / "s0", device="cpu")
    embedded, skipped = build_corpus(data / "cat" / "bad")
    gone = data / "thing" / "vanishes.png"
    Image.new("RGB", (40, 40), (1, 2, 3)).save(gone)

    def vanish(stage, done, total):  # delete a file after it was hashed, before it is decoded
        if stage == "embed" and done == 0 and gone.exists():
            gone.unlink()

    r = extract(data, lite0, out=tmp_path / "t.parquet", store=tmp_path / "s1", device="cpu",
                batch_size=4, progress=vanish)
    got = {p.removeprefix("cat/bad/") for p in r.table.paths if p.startswith("cat/bad/")}
    assert got == embedded
    reasons = {p.removeprefix("cat/bad/"): why for p, why in r.stats.failures}
    assert reasons.pop("thing/vanishes.png").startswith("file disappeared")
    assert set(reasons) == set(skipped)
    for name, fragment in skipped.items():
        assert fragment in reasons[name], (name, reasons[name])
    # the rest of the set is untouched: byte-identical embeddings
    idx = {p: i for i, p in enumerate(r.table.paths)}
    np.testing.assert_array_equal(r.table.X[[idx[p] for p in clean.table.paths]], clean.table.X)
    # EXIF-rotated equals upright (the decoder applies the orientation)
    spec = lite0.preprocess
    bad = data / "cat" / "bad"
    np.testing.assert_allclose(load_image(bad / "exif-rotated.jpg", spec).astype(float).mean(),
                               load_image(bad / "ok.jpg", spec).astype(float).mean(), atol=2)


SPEC = Preprocess(input_size=32, resize_size=36)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=4096))
def test_fuzz_random_bytes(data):
    try:
        out = load_image(data, SPEC, name="fuzz")
    except ImageError:
        return
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"]
FORMATS = {"PNG": {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}, "JPEG": {"L", "RGB", "CMYK"},
           "TIFF": {"1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"},
           "WEBP": {"RGB", "RGBA"}, "GIF": {"L", "P"}, "BMP": {"1", "L", "P", "RGB"}}


# every example is a pair the format can save: none is drawn only to be thrown away
PAIRS = [(fmt, mode) for fmt in sorted(FORMATS) for mode in MODES if mode in FORMATS[fmt]]


@settings(max_examples=120, deadline=3000, suppress_health_check=[HealthCheck.too_slow])
@given(pair=st.sampled_from(PAIRS), w=st.integers(1, 300), h=st.integers(1, 300),
       seed=st.integers(0, 2**16), cut=st.floats(0.05, 1.0))
def test_fuzz_valid_and_damaged_images(pair, w, h, seed, cut):
    fmt, mode = pair
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    b = io.BytesIO()
    img.save(b, fmt)
    data = b.getvalue()
    try:
        out = load_image(data[: max(1, int(len(data) * cut))] if cut < 1 else data, SPEC, name="fuzz")
    except ImageError:
        assert cut < 1, f"a valid {fmt} {mode} {w}x{h} image was refused"
        return
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_unreadable_file(tmp_path, lite0):
    data = make_image_folder(tmp_path / "d")
    p = data / "cat" / "cat_0.jpg"
    os.chmod(p, 0)
    out = tmp_path / "t.parquet"
    # a real process that meets file permissions, even when the tests run as root
    cmd = unprivileged([sys.executable, "-m", "featx.cli", "extract", str(data), "--out", str(out),
                        "--store", str(tmp_path / "s"), "--device", "cpu", "-q"])
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "t.parquet.report.json").read_text())
    assert {"path": "cat/cat_0.jpg", "reason": "permission denied"} in report["failures"]
    assert "cat/cat_0.jpg" not in read_table(out).paths and len(read_table(out)) == 7
