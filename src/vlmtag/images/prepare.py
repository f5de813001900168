"""Decode once, orient, convert to RGB, downscale to ``max_pixels``, encode once: unless the image needs none of it.

Output is a baseline JPEG (quality 90, 4:2:0 chroma, no metadata), labelled ``image/jpeg``; the one exception is the
light path below, which sends the source bytes unchanged, labelled with their own type (``image/jpeg``,
``image/png`` or ``image/webp``). ``reencode=True`` turns the light path off, for servers that want one format.

Three ways through, cheapest first:

1. Light path (``light.py``): an image that needs no work (an upright 8-bit RGB or grey JPEG, PNG or WebP within
   ``max_pixels``, without transparency, animation or metadata beyond the orientation) is sent as its original
   bytes, decided from the header without decoding a pixel. Everything else takes one of the two paths below.
2. JPEG fast path: libjpeg-turbo (simplejpeg) decodes at a DCT scale (M/8) still at least the target size,
   OpenCV resizes the rest of the way (bilinear up to 1.5x, ``INTER_AREA`` beyond), the EXIF orientation (read
   by Pillow from the header, without decoding) is applied by a numpy flip/rotate of the small image, and
   simplejpeg encodes.
3. Everything else (PNG, WebP, GIF, TIFF, BMP, CMYK JPEGs, JPEGs that libjpeg-turbo only decodes with
   warnings): Pillow, with ``draft()`` shrink-on-load for JPEGs, the mode conversions below, then the same resize,
   orientation and encoder.

Mode conversions: transparency (RGBA, LA, P with a transparent index, ...) is composited on white; CMYK, YCbCr,
1-bit and L become RGB; 16-bit and 32-bit integer images are scaled from their range (65535 -> 255) rather than
clipped; float images in [0, 1] are scaled by 255, others clipped to [0, 255] or, outside that range, stretched
from their minimum and maximum. Colour profiles (ICC) are not applied. Animated images give their first frame.
"""

from __future__ import annotations

import hashlib
import math

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from vlmtag.defaults import DEFAULT_MAX_PIXELS
from vlmtag.images.encoded import EncodedImage
from vlmtag.images.fetch import FetchLimits, ImageError, read_source
from vlmtag.images.light import MAX_SOURCE_PIXELS, decode_error, exif_orientation, read_header
from vlmtag.images.memory import DecodeBudget, process_budget

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "EncodedImage",
    "ImageError",
    "JPEG_QUALITY",
    "MAX_SOURCE_PIXELS",
    "load_image",
    "max_pixels_for_short_side",
    "prepare_image",
    "prepare_opened",
]

JPEG_QUALITY = 90
_LINEAR_MAX_RATIO = 1.5


def max_pixels_for_short_side(width: int, height: int, short_side: int) -> int:
    """The ``max_pixels`` at which a ``width`` x ``height`` image comes out with its short side = ``short_side``."""
    if min(width, height, short_side) < 1:
        raise ValueError("width, height and short_side must be positive")
    short, long = sorted((width, height))
    return short_side * math.ceil(long * short_side / short)


def target_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size with the same aspect ratio and at most ``max_pixels`` pixels; never larger than the input."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    while w * h > max_pixels:  # floating-point slack; at most a step or two
        if w * height >= h * width:
            w -= 1
        else:
            h -= 1
    return max(1, w), max(1, h)


def prepare_image(
    raw: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_source_pixels: int = MAX_SOURCE_PIXELS,
    sha256: str | None = None,
    max_aspect_ratio: float | None = None,
    min_side: int = 1,
    pad_to_aspect: bool = False,
    budget: DecodeBudget | None = None,
    reencode: bool = False,
) -> EncodedImage:
    """Decode ``raw``, apply EXIF orientation, convert to RGB, downscale to at most ``max_pixels``, encode once.

    An image that needs none of that (see "Light path" in the module docstring: an upright 8-bit RGB or grey JPEG,
    PNG or WebP within ``max_pixels``, without transparency, animation or metadata beyond the orientation) is
    sent as its original bytes, labelled with their own MIME type. ``reencode=True`` turns that off: every image is
    decoded and sent as a baseline JPEG, for servers that want one format.

    ``sha256``: the hex digest of ``raw`` when the caller has it already (hashing a large photo again costs
    milliseconds); computed otherwise. The model's geometry is checked from the header, before decoding: an image
    whose sides differ by more than ``max_aspect_ratio`` (Qwen2.5-VL's processor refuses past 200:1), or whose
    shorter side is under ``min_side`` pixels, is an ``ImageError``; with ``pad_to_aspect`` a too-long image is
    padded with white to that ratio instead. Decodes hold their estimated memory from ``budget`` (by default the
    process's, see ``memory.py``).
    """
    raw = bytes(raw)
    im, pad, mime = read_header(raw, max_pixels=max_pixels, max_source_pixels=max_source_pixels,
                                max_aspect_ratio=max_aspect_ratio, min_side=min_side, pad_to_aspect=pad_to_aspect,
                                reencode=reencode)
    digest = sha256 or hashlib.sha256(raw).hexdigest()
    if mime is not None:
        return EncodedImage(raw, mime, im.size[0], im.size[1], digest)
    return prepare_opened(raw, im, pad, digest, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio,
                          budget=budget)


def prepare_opened(raw: bytes, im: Image.Image, pad: bool, sha256: str, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                   max_aspect_ratio: float | None = None, budget: DecodeBudget | None = None) -> EncodedImage:
    """``prepare_image``'s decoding, for an image whose header ``read_header`` has opened (``im``, ``pad``) and
    found it needs decoding: the loader reads the header before it loads the codecs (this module)."""
    budget = budget or process_budget()
    if im.format in ("JPEG", "MPO") and not pad:
        done = _prepare_jpeg(raw, im, max_pixels, budget)
        if done is not None:
            data, width, height = done
            return EncodedImage(data, "image/jpeg", width, height, sha256)
    with budget.reserve(_decoded_bytes(im, max_pixels)):
        arr = _decode_with_pillow(im, max_pixels)
    if pad:
        # 2% spare, so that rounding in the downscale after padding cannot take the ratio back over the limit
        arr = _pad(arr, 0.98 * (max_aspect_ratio or 1.0))
        arr = _pad(_resize(arr, *target_size(arr.shape[1], arr.shape[0], max_pixels)), max_aspect_ratio or 1.0)
    data = _encode(arr)
    return EncodedImage(data, "image/jpeg", arr.shape[1], arr.shape[0], sha256)


def _pad(arr: np.ndarray, max_aspect_ratio: float) -> np.ndarray:
    """White bands on both sides of the shorter dimension, up to `max_aspect_ratio`."""
    h, w = arr.shape[:2]
    if w >= h:
        need = math.ceil(w / max_aspect_ratio) - h
        before = need // 2
        return np.pad(arr, ((before, need - before), (0, 0), (0, 0)), constant_values=255) if need > 0 else arr
    need = math.ceil(h / max_aspect_ratio) - w
    before = need // 2
    return np.pad(arr, ((0, 0), (before, need - before), (0, 0)), constant_values=255) if need > 0 else arr


def _decoded_bytes(im: Image.Image, max_pixels: int) -> int:
    """What decoding `im` on the Pillow path may hold at its peak, from the header: the decoded pixels, one
    converted copy (RGB, or premultiplied alpha before the reduction), and the small result."""
    width, height = im.size
    bands = len(im.getbands())
    depth = 2 if im.mode.startswith("I;16") else 4 if im.mode in ("I", "F") else 1
    tw, th = target_size(width, height, max_pixels)
    return width * height * (bands * depth + 4) + tw * th * 6


def load_image(
    source: str | bytes,
    *,
    base_dir: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    limits: FetchLimits | None = None,
    max_source_pixels: int = MAX_SOURCE_PIXELS,
    reencode: bool = False,
) -> EncodedImage:
    """``read_source`` (a path, URL or data: URI; raw bytes are used as they are) then ``prepare_image``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        raw = bytes(source)
    else:
        raw = read_source(source, base_dir=base_dir, limits=limits or FetchLimits())
    return prepare_image(raw, max_pixels=max_pixels, max_source_pixels=max_source_pixels, reencode=reencode)


# ---------------------------------------------------------------------------------------------- JPEG fast path


def _prepare_jpeg(raw: bytes, im: Image.Image, max_pixels: int,
                  budget: DecodeBudget) -> tuple[bytes, int, int] | None:
    """libjpeg-turbo decode at reduced DCT scale; None when Pillow should take over (CMYK, warnings, ...)."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(raw)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray", "RGB") or (width, height) != im.size:
        return None
    orientation = exif_orientation(im)
    tw, th = target_size(width, height, max_pixels)
    dw, dh = _jpeg_decode_size(width, height, tw, th)
    with budget.reserve(dw * dh * 3 + tw * th * 6):
        try:
            arr = simplejpeg.decode_jpeg(raw, colorspace="RGB", min_width=dw, min_height=dh, strict=True)
        except ValueError:
            return None
        arr = _orient(_resize(arr, tw, th), orientation)
    return _encode(arr), arr.shape[1], arr.shape[0]


def _jpeg_decode_size(width: int, height: int, tw: int, th: int) -> tuple[int, int]:
    """The DCT-scaled size (width * M/8) to decode at, for a final size of tw x th.

    libjpeg-turbo scales by M/8 while decoding. Measured here, M = 1, 2, 3, 4 cost about the same as each other
    and far less than a full decode; M = 5, 6, 7 cost more than a full decode. So take the smallest of those
    fast scales that is still >= the target, unless that leaves a ratio needing INTER_AREA and a slow scale
    leaves one INTER_LINEAR handles well (1920x1080 -> 1194x672: 5/8 + linear beats 8/8 + area).
    """

    def size(m: int) -> tuple[int, int]:
        return -(-width * m // 8), -(-height * m // 8)

    def fits(m: int) -> bool:
        w, h = size(m)
        return w >= tw and h >= th

    m = next(m for m in (1, 2, 3, 4, 8) if fits(m))
    if _needs_area(size(m), tw, th):
        m = next((s for s in (5, 6, 7) if s < m and fits(s) and not _needs_area(size(s), tw, th)), m)
    return size(m)


# ---------------------------------------------------------------------------------------------- Pillow path


def _decode_with_pillow(im: Image.Image, max_pixels: int) -> np.ndarray:
    tw, th = target_size(*im.size, max_pixels)
    try:
        if (tw, th) != im.size and im.format in ("JPEG", "MPO"):
            im.draft(None, (tw, th))  # shrink-on-load by 1/2, 1/4 or 1/8, still >= the target
        im.load()
    except Image.DecompressionBombError:
        raise ImageError("image too large (decompression bomb)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as e:
        raise decode_error(e) from None
    orientation = exif_orientation(im)  # after load: PNG may keep its eXIf chunk after the pixels
    im = _reduce(im, tw, th)
    arr = _to_rgb(im)
    return _orient(_resize(arr, tw, th), orientation)


def _reduce(im: Image.Image, tw: int, th: int) -> Image.Image:
    """Shrink a much larger image by a whole factor (box filter) before any conversion, so the conversions run
    on the small image: for a huge RGBA PNG, compositing on white at full size would hold four copies. Alpha is
    premultiplied while shrinking, so transparent pixels do not bleed their colour into the edges."""
    factor = min(im.size[0] // max(tw, 1), im.size[1] // max(th, 1))
    if factor < 2 or im.mode not in ("RGB", "RGBA", "L", "LA"):
        return im
    if im.mode in ("RGBA", "LA"):
        premultiplied = "RGBa" if im.mode == "RGBA" else "La"
        return im.convert(premultiplied).reduce(factor).convert(im.mode)
    return im.reduce(factor)


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode as an H x W x 3 uint8 RGB array."""
    mode = im.mode
    try:
        if mode == "RGB" and "transparency" not in im.info:
            return np.asarray(im)
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info or (
            mode == "P" and im.palette is not None and im.palette.mode == "RGBA"
        ):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        if mode == "I" or mode.startswith("I;16") or mode == "F":
            return _gray_to_rgb(_to_uint8(np.asarray(im), mode))
        if mode == "1":
            return _gray_to_rgb(np.asarray(im.convert("L")))
        if mode == "L":
            return _gray_to_rgb(np.asarray(im))
        return np.asarray(im.convert("RGB"))  # P, CMYK, YCbCr, LAB, HSV, ...
    except (ValueError, OSError) as e:
        raise ImageError(f"unsupported colour mode {mode} ({e})") from None


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Deep (16/32-bit integer, float) gray values to 0..255, by their range rather than by clipping."""
    if mode.startswith("I;16"):
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        pass
    elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
        a = a / 257.0
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _gray_to_rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[:, :, None], 3, axis=2)


# ---------------------------------------------------------------------------------------------- shared steps


def _needs_area(size: tuple[int, int], width: int, height: int) -> bool:
    return max(size[0] / width, size[1] / height) > _LINEAR_MAX_RATIO


def _resize(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    """Downscale to width x height: bilinear up to a 1.5x reduction, area averaging beyond.

    Against a Lanczos reference on detailed photos, INTER_LINEAR is as close as INTER_AREA (or closer) up to
    1.5x and costs a fraction of it; past that, bilinear starts to alias and INTER_AREA is the better filter.
    """
    if arr.shape[1] == width and arr.shape[0] == height:
        return arr
    area = _needs_area((arr.shape[1], arr.shape[0]), width, height)
    return cv2.resize(arr, (width, height), interpolation=cv2.INTER_AREA if area else cv2.INTER_LINEAR)


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation 1..8 applied to an H x W x C array, as ``ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return arr.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(arr, -1)
    if orientation == 7:
        return arr[::-1, ::-1].transpose(1, 0, 2)
    if orientation == 8:
        return np.rot90(arr, 1)
    return arr


def _encode(arr: np.ndarray) -> bytes:
    return simplejpeg.encode_jpeg(np.ascontiguousarray(arr), quality=JPEG_QUALITY, colorsubsampling="420")
