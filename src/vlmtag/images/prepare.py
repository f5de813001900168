"""Decode once, orient, convert to RGB, downscale to ``max_pixels``, encode once: unless the image needs none of it.

Output is a baseline JPEG (quality 90, 4:2:0 chroma, no metadata), labelled ``image/jpeg``; the one exception is the
light path below, which sends the source bytes unchanged, labelled with their own type (``image/jpeg``,
``image/png`` or ``image/webp``). ``reencode=True`` turns the light path off, for servers that want one format.

Three ways through, cheapest first:

1. Light path: an image that needs no work is sent as its original bytes. Identical bytes mean no generation loss
   and no decode or encode cost: it is decided from the header (Pillow's lazy open, which every path does anyway,
   plus a few byte checks), without decoding a pixel. An image qualifies when all of these hold:

   - Format: a JPEG (Huffman-coded baseline, extended or progressive; not arithmetic-coded, lossless or
     hierarchical, which some decoders lack; not MPO, whose extra frames would ride along), a PNG or a WebP.
   - Size: at most ``max_pixels``, and the model's geometry needs no padding.
   - Colour: 8-bit RGB or 8-bit greyscale, which every server decodes to the same pixels: a YCbCr or grey JPEG
     (not CMYK/YCCK, not RGB-coded), a PNG of bit depth 8 and colour type 0 or 2 (read from IHDR: Pillow calls a
     16-bit RGB PNG "RGB"), a WebP without alpha. No palette, no alpha, no tRNS transparency, no animation (APNG,
     animated WebP): decoders differ in how they flatten transparency, map palettes, reduce 16 bits to 8, convert
     CMYK or pick a frame, so those images take the conversions below, done once and the same way for every server.
   - Upright and private: no EXIF block, or one holding nothing but Orientation = 1 and the structural tags
     (resolution, YCbCr positioning), in a single IFD. An EXIF orientation other than 1 needs the pixels turned;
     EXIF with anything more (camera maker, GPS position, dates, a thumbnail), an XMP packet or IPTC (Photoshop)
     data means re-encoding, which drops it, so it never leaves the machine. A PNG's eXIf chunk may follow the
     pixel data: the chunk walk below finds it. Text comments (JPEG COM, PNG tEXt other than XMP or ImageMagick's
     raw EXIF/IPTC profiles) and colour profiles ride along; ICC profiles are not applied on any path.
   - Complete and lean, by cheap checks that read no compressed data: a JPEG's segments run to a start of scan and
     the file ends with the EOI marker (zero or whitespace padding after it aside); a PNG's chunks run intact to a
     final IEND; a WebP's RIFF size matches the file and its chunks fill it. The file is at most about 1 byte per
     pixel (JPEG) or the raw pixel size (PNG: 1 or 3 bytes per pixel plus a filter byte per row; WebP: 3 bytes
     per pixel), plus 16 KiB, so a file stuffed with extra data is re-encoded. A file damaged in the middle of its
     compressed data is not caught here: the server that decodes it refuses it.

   Anything that fails a check simply takes the next way through, which reports a broken file as an ImageError.
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
import io
import math
import re

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from vlmtag.defaults import DEFAULT_MAX_PIXELS
from vlmtag.images.encoded import EncodedImage
from vlmtag.images.fetch import FetchLimits, ImageError, read_source
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
]

JPEG_QUALITY = 90
# Largest decoded image accepted (width * height), checked from the header before any pixel is decoded.
# Pillow's own default; Pillow itself also refuses images over twice its Image.MAX_IMAGE_PIXELS.
MAX_SOURCE_PIXELS = 89_478_485
# Formats we decode. Others Pillow can identify (EPS, which runs Ghostscript; PDF; ...) are refused.
ALLOWED_FORMATS = frozenset(
    {"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "PPM", "TGA", "ICO", "AVIF", "HEIF", "JPEG2000",
     "PCX", "SGI", "QOI", "PSD", "DDS"}
)
# The light path (see the module docstring): formats sent as they are, and what a file may weigh beyond its pixels.
_LIGHT_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
_LIGHT_SLACK = 16 * 1024  # headers, quantisation and Huffman tables, a colour profile
_LIGHT_JPEG_BYTES_PER_PIXEL = 1.0
_LIGHT_JPEG_FRAMES = frozenset({0xC0, 0xC1, 0xC2})  # SOF0-2: baseline, extended, progressive; Huffman-coded
_JPEG_PADDING = b"\x00\t\n\r "  # what some writers leave after the EOI marker
# EXIF tags a light-path image may carry: Orientation (= 1), X/YResolution, ResolutionUnit, YCbCrPositioning.
_LIGHT_EXIF_TAGS = frozenset({0x0112, 0x011A, 0x011B, 0x0128, 0x0213})
_LIGHT_EXIF_MAX_BYTES = 256  # those five tags take under 100
# PNG text chunks that carry XMP, or EXIF/IPTC/XMP the way ImageMagick writes them.
_PNG_METADATA_KEYWORDS = (b"XML:com.adobe.xmp", b"Raw profile type")
_ORIENTATION_TAG = 0x0112
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
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")
    raw = bytes(raw)
    if not raw:
        raise ImageError("empty file")
    digest = sha256 or hashlib.sha256(raw).hexdigest()
    im = _open(raw, max_source_pixels)
    pad = _check_geometry(*im.size, max_aspect_ratio, min_side, pad_to_aspect)
    if not reencode and not pad:
        mime = _light_mime(raw, im, max_pixels)
        if mime is not None:
            return EncodedImage(raw, mime, im.size[0], im.size[1], digest)
    budget = budget or process_budget()
    if im.format in ("JPEG", "MPO") and not pad:
        done = _prepare_jpeg(raw, im, max_pixels, budget)
        if done is not None:
            data, width, height = done
            return EncodedImage(data, "image/jpeg", width, height, digest)
    with budget.reserve(_decoded_bytes(im, max_pixels)):
        arr = _decode_with_pillow(im, max_pixels)
    if pad:
        # 2% spare, so that rounding in the downscale after padding cannot take the ratio back over the limit
        arr = _pad(arr, 0.98 * (max_aspect_ratio or 1.0))
        arr = _pad(_resize(arr, *target_size(arr.shape[1], arr.shape[0], max_pixels)), max_aspect_ratio or 1.0)
    data = _encode(arr)
    return EncodedImage(data, "image/jpeg", arr.shape[1], arr.shape[0], digest)


def _check_geometry(width: int, height: int, max_aspect_ratio: float | None, min_side: int, pad: bool) -> bool:
    """True when the image must be padded to `max_aspect_ratio`; an ImageError when the model cannot take it."""
    short, long = sorted((width, height))
    if max_aspect_ratio is not None and long > max_aspect_ratio * short:
        if pad:
            return True
        raise ImageError(f"aspect ratio {long / short:,.0f}:1 ({width}x{height}) is beyond the model's "
                         f"{max_aspect_ratio:g}:1 (max_aspect_ratio); set pad_to_aspect: true to pad it instead")
    if short < min_side:
        raise ImageError(f"image too small: {width}x{height}, a side under {min_side} pixels (min_image_side)")
    return False


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


# ---------------------------------------------------------------------------------------------- opening


def _open(raw: bytes, max_source_pixels: int) -> Image.Image:
    """Pillow's lazy open (header only), with every way it fails turned into an ImageError."""
    try:
        im = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        got = f"{m.group(1)} pixels" if m else "too many pixels"
        limit = max_source_pixels
        raise ImageError(f"image too large: {got} exceeds the limit of {limit} (decompression bomb)") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (cannot identify format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise _decode_error(e, raw) from None
    if im.format not in ALLOWED_FORMATS:
        raise ImageError(f"unsupported image format {im.format}")
    width, height = im.size
    if width < 1 or height < 1:
        raise ImageError(f"invalid image size {width}x{height}")
    if width * height > max_source_pixels:
        raise ImageError(
            f"image too large: {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{max_source_pixels} (decompression bomb)"
        )
    return im


def _decode_error(e: BaseException, raw: bytes = b"") -> ImageError:
    text = str(e)
    if "truncated" in text or isinstance(e, EOFError) or "premature end" in text.lower():
        return ImageError("truncated image")
    if "Decompressed data too large" in text:  # a zlib bomb in a PNG metadata chunk; the pixels may be fine
        chunk, size = _largest_png_chunk(raw, (b"iCCP", b"zTXt", b"iTXt"))
        what = "ICC profile" if chunk == b"iCCP" else "compressed text chunk"
        return ImageError(f"{what} too large ({size:,} bytes compressed, past Pillow's safety limit when "
                          "expanded): refused before decoding")
    text = text.strip() or type(e).__name__
    return ImageError(f"corrupt image ({text[:100]})")


def _largest_png_chunk(raw: bytes, kinds: tuple[bytes, ...]) -> tuple[bytes, int]:
    """The largest chunk of one of `kinds` in a PNG, and its length (0 when there is none)."""
    best, size, pos = b"", 0, 8
    while pos + 8 <= len(raw):
        length = int.from_bytes(raw[pos : pos + 4], "big")
        kind = raw[pos + 4 : pos + 8]
        if kind in kinds and length > size:
            best, size = kind, length
        if kind == b"IEND":
            break
        pos += 12 + length
    return best, size


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block is no reason to drop the image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


# ---------------------------------------------------------------------------------------------- light path


def _light_mime(raw: bytes, im: Image.Image, max_pixels: int) -> str | None:
    """The MIME type to send `raw` under as it is, or None when it needs decoding (module docstring, path 1)."""
    mime = _LIGHT_MIME.get(im.format)  # a multi-picture JPEG is "MPO"
    if mime is None or im.mode not in ("RGB", "L"):
        return None
    width, height = im.size
    if width * height > max_pixels:
        return None
    if im.format == "JPEG":
        light = _jpeg_is_light(raw, im)
    elif im.format == "PNG":
        light = _png_is_light(raw, width, height)
    else:
        light = _webp_is_light(raw, width, height)
    return mime if light else None


def _jpeg_is_light(raw: bytes, im: Image.Image) -> bool:
    width, height = im.size
    if len(raw) > _LIGHT_SLACK + _LIGHT_JPEG_BYTES_PER_PIXEL * width * height:
        return False
    # Complete: ends with EOI. Entropy-coded data never holds FF D9, so a file cut short cannot end with it.
    if not raw.endswith(b"\xff\xd9") and not raw[-64:].rstrip(_JPEG_PADDING).endswith(b"\xff\xd9"):
        return False
    info = im.info
    if "xmp" in info or "photoshop" in info:  # Pillow's names for the XMP packet and the IPTC (APP13) block
        return False
    exif = info.get("exif")
    if exif is not None and not _exif_is_bare(exif):
        return False
    for name, data in getattr(im, "applist", ()):  # other APP1 (extended XMP, FLIR, ...) and APP13 blocks
        if (name == "APP1" and not data.startswith(b"Exif\x00\x00")) or name == "APP13":
            return False
    if im.mode == "RGB" and not _jpeg_is_ycbcr(im):
        return False
    # Pillow's header walk set a tile only on reaching a start of scan; the frame type it does not keep.
    return bool(im.tile) and _jpeg_frame(raw) in _LIGHT_JPEG_FRAMES


def _jpeg_is_ycbcr(im: Image.Image) -> bool:
    """Whether a 3-component JPEG holds YCbCr, by libjpeg's rules: a JFIF marker says so; else an Adobe marker's
    transform (1: YCbCr, 0: RGB); else component ids 'R', 'G', 'B' mean RGB."""
    info = im.info
    if "jfif" in info:
        return True
    if "adobe" in info:
        return info.get("adobe_transform") == 1
    return tuple(layer[0] for layer in getattr(im, "layer", ())) != (82, 71, 66)


def _jpeg_frame(raw: bytes) -> int:
    """The second byte of the frame marker (0xC0 for baseline, ...), found by walking the segments from SOI; 0 when
    they do not lead to one before a scan."""
    pos, end = 2, len(raw)
    while pos + 4 <= end:
        if raw[pos] != 0xFF:
            return 0
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn, not DHT/JPG/DAC
            return marker
        if 0xD0 <= marker <= 0xDA:  # RSTn, SOI, EOI or a scan before any frame
            return 0
        pos += 2 + int.from_bytes(raw[pos + 2 : pos + 4], "big")
    return 0


def _png_is_light(raw: bytes, width: int, height: int) -> bool:
    """Bit depth 8, grey or RGB (from IHDR); no tRNS, animation or metadata chunk; chunks intact up to a final IEND."""
    if raw[12:16] != b"IHDR" or len(raw) < 33 or raw[24] != 8 or raw[25] not in (0, 2):
        return False
    channels = 3 if raw[25] == 2 else 1
    end = len(raw)
    if end > _LIGHT_SLACK + (channels * width + 1) * height:  # + 1: the filter byte of each row
        return False
    pos = 8
    while pos + 12 <= end:
        length = int.from_bytes(raw[pos : pos + 4], "big")
        kind = raw[pos + 4 : pos + 8]
        body = pos + 8
        pos = body + length + 4  # + CRC
        if pos > end:
            return False
        if kind == b"IDAT":
            continue
        if kind == b"IEND":
            return pos == end
        if kind in (b"tRNS", b"acTL", b"fcTL", b"fdAT"):
            return False
        if kind == b"eXIf":
            if not _exif_is_bare(raw[body : body + length]):
                return False
        elif kind in (b"tEXt", b"zTXt", b"iTXt") and raw[body : body + 80].startswith(_PNG_METADATA_KEYWORDS):
            return False
    return False


def _webp_is_light(raw: bytes, width: int, height: int) -> bool:
    """RIFF size = file size, chunks fill it; no alpha, animation, XMP or EXIF beyond orientation 1 (Pillow's mode
    already says RGB, so a lossless VP8L image has no alpha either)."""
    end = len(raw)
    if end > _LIGHT_SLACK + 3 * width * height or int.from_bytes(raw[4:8], "little") + 8 != end:
        return False
    pos = 12
    while pos + 8 <= end:
        kind = raw[pos : pos + 4]
        size = int.from_bytes(raw[pos + 4 : pos + 8], "little")
        body = pos + 8
        pos = body + size + (size & 1)  # chunks are padded to an even size
        if pos > end:
            return False
        if kind == b"VP8X":
            if size < 10 or raw[body] & 0x16:  # flags: alpha 0x10, XMP 0x04, animation 0x02
                return False
        elif kind == b"EXIF":
            if not _exif_is_bare(raw[body : body + size]):
                return False
        elif kind in (b"ALPH", b"ANIM", b"ANMF", b"XMP "):
            return False
    return pos == end


def _exif_is_bare(data: bytes) -> bool:
    """Whether an EXIF block (TIFF structure, after an optional "Exif\\0\\0") holds a single IFD with nothing but
    Orientation = 1 and the structural tags: no Exif or GPS sub-IFD, no thumbnail, no maker."""
    if data.startswith(b"Exif\x00\x00"):
        data = data[6:]
    if len(data) > _LIGHT_EXIF_MAX_BYTES:
        return False
    head = data[:4]
    order = "little" if head == b"II*\x00" else "big" if head == b"MM\x00*" else None
    if order is None:
        return False
    ifd = int.from_bytes(data[4:8], order)
    if ifd < 8 or ifd + 2 > len(data):
        return False
    entries = ifd + 2
    stop = entries + 12 * int.from_bytes(data[ifd:entries], order)
    if stop + 4 > len(data) or int.from_bytes(data[stop : stop + 4], order) != 0:  # a next IFD: a thumbnail
        return False
    one_short = (3).to_bytes(2, order) + (1).to_bytes(4, order)  # type SHORT, count 1
    for pos in range(entries, stop, 12):
        tag = int.from_bytes(data[pos : pos + 2], order)
        if tag not in _LIGHT_EXIF_TAGS:
            return False
        if tag == _ORIENTATION_TAG and (
            data[pos + 2 : pos + 8] != one_short or int.from_bytes(data[pos + 8 : pos + 10], order) != 1
        ):
            return False
    return True


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
    orientation = _orientation(im)
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
        raise _decode_error(e) from None
    orientation = _orientation(im)  # after load: PNG may keep its eXIf chunk after the pixels
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
