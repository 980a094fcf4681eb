"""Images: key files by content, decode + resize + crop (finding them is ``embed.scan``).

``thumbnail`` is the small picture reports and maps show (not a model input).

``load_image`` is the one preprocessing function: extraction, prediction,
fine-tuning and the Ray engine all call it, so pixels reach every model the
same way.

Two decoders (``Preprocess.decoder``): ``"simplejpeg"`` decodes JPEG pixels with
libjpeg-turbo through simplejpeg, in one call that releases the GIL, DCT-domain
downscaled by the same 1/2, 1/4, 1/8 rule as Pillow's ``draft``; ``"pillow"``
is the path featx had before. Everything around the pixels is Pillow's in
both: reading the header (format, size, the bomb check, EXIF orientation),
every format but plain RGB/grey JPEG (CMYK, PNG, WebP, ...), every file
libjpeg-turbo calls damaged (Pillow gives its verdict, as before), and the
resampling (``resize_crop``).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from featx.backbones.cards import DEFAULT_DECODER, Preprocess
from featx.embed.remote import is_url, read_url
from featx.errors import ImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
# Refuse anything whose header claims more pixels than this (decompression bombs).
MAX_PIXELS = 64_000_000
MAX_FILE_BYTES = 256 * 1024 * 1024
ImageFile.LOAD_TRUNCATED_IMAGES = False

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def content_key(data: bytes) -> str:
    """Key of an image: hash of its bytes, so renames are free and edits re-extract."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def read_bytes(path: str | os.PathLike) -> bytes:
    """Read a file for decoding, refusing empty and absurdly large files with an ImageError.

    A URL (``s3://``, ``file://``...: ``featx.embed.remote``) is read through fsspec,
    with the same limits; a network error is an ImageError too.
    """
    p = str(path)
    if is_url(p):
        return read_url(p, MAX_FILE_BYTES)
    try:
        size = os.path.getsize(p)
        if size == 0:
            raise ImageError(p, "empty file (0 bytes)")
        if size > MAX_FILE_BYTES:
            raise ImageError(p, f"file too large ({size} bytes > {MAX_FILE_BYTES})")
        with open(p, "rb") as f:
            return f.read()
    except ImageError:
        raise
    except IsADirectoryError:
        raise ImageError(p, "is a directory") from None
    except FileNotFoundError:
        raise ImageError(p, "file disappeared before it could be read") from None
    except PermissionError:
        raise ImageError(p, "permission denied") from None
    except OSError as e:
        raise ImageError(p, f"cannot read: {e.strerror or e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing transparency on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit integer grayscale: scale to 8 bits instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        img = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK (PIL inverts Adobe CMYK), YCbCr, LAB, RGBX
    return img


# EXIF orientation -> the transpose that shows the picture upright (as ImageOps.exif_transpose)
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _draft_request(w: int, h: int, draft_size: int | None) -> tuple[int, int] | None:
    """The size asked of a JPEG decoder that may downscale in the DCT domain, or None."""
    if not draft_size:
        return None
    scale = min(w, h) / draft_size
    if scale < 2:
        return None
    return int(np.ceil(w / scale)), int(np.ceil(h / scale))


def _draft_factor(w: int, h: int, request: tuple[int, int] | None) -> int:
    """The reduction Pillow's ``JpegImageFile.draft`` picks for ``request``: 8, 4, 2 or 1."""
    if request is None:
        return 1
    scale = min(w // request[0], h // request[1])
    return next(a for a in (8, 4, 2, 1) if scale >= a)


def _simplejpeg_pixels(data: bytes, img: Image.Image, request: tuple[int, int] | None) -> Image.Image | None:
    """Upright RGB pixels of a plain JPEG through simplejpeg; None hands the file to Pillow.

    Scaled by the factor Pillow's draft would use (so the two decoders see the same
    grid), libjpeg-turbo's accurate DCT and smooth upsampling. strict=True turns every
    libjpeg warning (truncated, corrupt data) into an error, and such a file goes back
    to Pillow, which decides as it always did.
    """
    import simplejpeg

    w, h = img.size
    k = _draft_factor(w, h, request)
    size = (-(-h // k), -(-w // k))
    try:
        arr = simplejpeg.decode_jpeg(data, "RGB", min_height=size[0], min_width=size[1], strict=True)
    except ValueError:
        return None
    if arr.shape != (*size, 3):
        return None
    out = Image.fromarray(arr, "RGB")
    method = _ORIENTATION.get(img.getexif().get(0x0112, 1))
    return out.transpose(method) if method is not None else out


def decode(data: bytes, name: str = "<bytes>", draft_size: int | None = None,
           decoder: str = DEFAULT_DECODER) -> Image.Image:
    """Decode image bytes to an upright RGB PIL image (first frame of animations).

    ``draft_size`` lets the JPEG decoder downscale by 1/2, 1/4 or 1/8 while
    keeping the shorter side >= draft_size, which is much faster for photos
    larger than the model input. ``decoder`` is ``Preprocess.decoder``: pass the
    spec's, so every stage decodes alike.
    """
    import io

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(name, f"image too large ({w}x{h} > {MAX_PIXELS} pixels), refused")
            if w < 1 or h < 1:
                raise ImageError(name, f"image has no pixels ({w}x{h})")
            request = _draft_request(w, h, draft_size) if img.format == "JPEG" else None
            if decoder == "simplejpeg" and img.format == "JPEG" and img.mode in ("RGB", "L"):
                fast = _simplejpeg_pixels(data, img, request)
                if fast is not None:
                    return fast
            if request is not None:
                img.draft("RGB", request)
            img.seek(0)
            # in place: without an orientation to undo, a copy would cost a pass over the pixels
            ImageOps.exif_transpose(img, in_place=True)
            img.load()
            return to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(name, "not an image (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(name, f"decompression bomb refused: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise ImageError(name, f"corrupt or truncated image: {e}") from None
    except MemoryError:
        raise ImageError(name, "image needs too much memory to decode") from None


def resize_crop(img: Image.Image, spec: Preprocess, box: tuple[float, float, float, float] | None = None,
                flip: bool = False) -> np.ndarray:
    """Resize shorter side to ``spec.resize_size`` and centre-crop ``spec.input_size``
    (``spec.crop == "none"``: resize the whole image to ``input_size`` square).

    ``box`` (left, top, right, bottom in source pixels) replaces the resize and
    centre crop with a crop of that region resized to the input size: the
    fine-tuning augmentation uses it, so training pixels come through the
    same resampling as inference pixels.
    """
    if 0 in img.size:  # nothing to resize: a division by zero below
        raise ImageError(getattr(img, "filename", "") or "<image>",
                         f"empty image ({img.size[1]}x{img.size[0]} pixels)")
    resample = _RESAMPLE[spec.interpolation]
    s = spec.input_size
    if box is not None:
        out = img.resize((s, s), resample, box=box)
    elif spec.crop == "none":  # the whole image, squeezed to the input size
        out = img.resize((s, s), resample)
    else:
        w, h = img.size
        scale = spec.resize_size / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        left, top = (nw - s) / 2 / scale, (nh - s) / 2 / scale
        # resample straight from the source to the crop: one pass, exact centre
        out = img.resize((s, s), resample, box=(left, top, left + s / scale, top + s / scale))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(out, dtype=np.uint8)
    return arr


def load_image(source: str | os.PathLike | bytes | np.ndarray | Image.Image, spec: Preprocess,
               name: str | None = None, draft: bool = True) -> np.ndarray:
    """Decode and preprocess one image to uint8 ``(input_size, input_size, 3)``.

    ``source`` is a path, encoded bytes, a PIL image, or a uint8 array
    (HxW grayscale or HxWx3 RGB). Raises ImageError naming the file and reason.
    """
    if isinstance(source, np.ndarray):
        img = array_to_pil(source, name or "<array>")
    elif isinstance(source, Image.Image):
        img = to_rgb(source)
    else:
        if isinstance(source, bytes):
            data, label = source, name or "<bytes>"
        else:
            label = name or str(source)
            data = read_bytes(source)
        img = decode(data, label, draft_size=spec.resize_size if draft else None, decoder=spec.decoder)
    return resize_crop(img, spec)


def array_to_pil(a: np.ndarray, name: str = "<array>") -> Image.Image:
    """A uint8 HxW or HxWx{1,3,4} array as an RGB PIL image."""
    if a.dtype != np.uint8:
        raise ImageError(name, f"array dtype must be uint8, got {a.dtype}")
    if a.ndim in (2, 3) and 0 in a.shape[:2]:
        raise ImageError(name, f"empty image ({a.shape[0]}x{a.shape[1]} pixels)")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        return Image.fromarray(a, "L").convert("RGB")
    if a.ndim == 3 and a.shape[2] in (3, 4):
        return to_rgb(Image.fromarray(np.ascontiguousarray(a), "RGB" if a.shape[2] == 3 else "RGBA"))
    raise ImageError(name, f"array shape must be (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")


def thumbnail(path: str, size: int) -> np.ndarray | None:
    """An RGB thumbnail of the image at ``path`` (EXIF-rotated, longest side ``size``), or None
    if it cannot be read now (reports leave it blank). A URL is read through fsspec."""
    try:
        with Image.open(io.BytesIO(read_bytes(path)) if is_url(path) else path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((size, size))
            return np.asarray(im)
    except (OSError, ValueError, Image.DecompressionBombError, ImageError):
        return None  # unreadable now: left blank, the CSV still lists it
