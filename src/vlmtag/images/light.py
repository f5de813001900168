"""Which images go as they are: the header every way through starts from, the model's geometry, and the light path.

Pillow only, no NumPy or OpenCV: a job whose images all go as they are never loads the codecs (``prepare.py``).

An image that needs no work is sent as its original bytes. Identical bytes mean no generation loss
and no decode or encode cost: it is decided from the header (Pillow's lazy open, which every path does anyway,
plus a few byte checks), without decoding a pixel. An image qualifies when all of these hold:

- Format: a JPEG (Huffman-coded baseline, extended or progressive; not arithmetic-coded, lossless or
  hierarchical, which some decoders lack; not MPO, whose extra frames would ride along), a PNG or a WebP.
- Size: at most ``max_pixels``, and the model's geometry needs no padding.
- Colour: 8-bit RGB or 8-bit greyscale, which every server decodes to the same pixels: a YCbCr or grey JPEG
  (not CMYK/YCCK, not RGB-coded), a PNG of bit depth 8 and colour type 0 or 2 (read from IHDR: Pillow calls a
  16-bit RGB PNG "RGB"), a WebP without alpha. No palette, no alpha, no tRNS transparency, no animation (APNG,
  animated WebP): decoders differ in how they flatten transparency, map palettes, reduce 16 bits to 8, convert
  CMYK or pick a frame, so those images take ``prepare.py``'s conversions, done once and the same way for
  every server.
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

Anything that fails a check simply takes the decoding path (``prepare.py``), which reports a broken file as an
ImageError.
"""

from __future__ import annotations

import io
import re

from PIL import Image, UnidentifiedImageError

from vlmtag.images.fetch import ImageError

__all__ = ["ALLOWED_FORMATS", "MAX_SOURCE_PIXELS", "check_geometry", "decode_error", "exif_orientation",
           "light_mime", "open_header", "read_header"]

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


def read_header(
    raw: bytes,
    *,
    max_pixels: int,
    max_source_pixels: int = MAX_SOURCE_PIXELS,
    max_aspect_ratio: float | None = None,
    min_side: int = 1,
    pad_to_aspect: bool = False,
    reencode: bool = False,
) -> tuple[Image.Image, bool, str | None]:
    """``raw``'s header (Pillow's lazy open), whether the image must be padded to the model's aspect ratio, and the
    MIME type it can be sent under as it is (None: it needs decoding); an ImageError when its header says it cannot
    be sent at all. The arguments are ``prepare_image``'s."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")
    if not raw:
        raise ImageError("empty file")
    im = open_header(raw, max_source_pixels)
    pad = check_geometry(*im.size, max_aspect_ratio, min_side, pad_to_aspect)
    return im, pad, None if reencode or pad else light_mime(raw, im, max_pixels)


def check_geometry(width: int, height: int, max_aspect_ratio: float | None, min_side: int, pad: bool) -> bool:
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


# ---------------------------------------------------------------------------------------------- opening


def open_header(raw: bytes, max_source_pixels: int) -> Image.Image:
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
        raise decode_error(e, raw) from None
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


def decode_error(e: BaseException, raw: bytes = b"") -> ImageError:
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


def exif_orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block is no reason to drop the image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


# ---------------------------------------------------------------------------------------------- light path


def light_mime(raw: bytes, im: Image.Image, max_pixels: int) -> str | None:
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
