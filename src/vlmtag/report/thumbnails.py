"""Small JPEG thumbnails for the gallery, embedded in the page as data: URLs.

Images are found the way the run found them: the bytes column first, then the path as written, relative paths
resolved against the run's images root. URLs are not fetched unless asked (a report should open offline and
building it should not touch the network). A thumbnail that cannot be made is a short reason, never an error.
"""

from __future__ import annotations

import base64
import binascii
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from vlmtag.images import FetchLimits, ImageError, load_image
from vlmtag.report.collect import Entry

THUMB_SIZE = 192  # longest side, pixels
THUMB_QUALITY = 72
_LIMITS = FetchLimits(connect_timeout=5.0, read_timeout=10.0, total_timeout=20.0)


@dataclass(frozen=True)
class Thumbnail:
    data_url: str | None  # data:image/jpeg;base64,... or None
    note: str = ""  # why there is no picture ("missing file", "URL not fetched", ...)
    width: int = 0
    height: int = 0


def _is_url(source: str) -> bool:
    head = source.strip()[:10].lower()
    return head.startswith("http://") or head.startswith("https://")


def _raw_bytes(raw: object) -> bytes | None:
    """A bytes column value as bytes: bytes as they are, {"bytes": ...} (Hugging Face), or base64 text (JSON)."""
    if isinstance(raw, dict):
        raw = raw.get("bytes")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return bytes(raw)
    if isinstance(raw, str):
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            return None
    return None


def make_thumbnail(entry: Entry, images_root: str | None, *, fetch_urls: bool = False,
                   size: int = THUMB_SIZE) -> Thumbnail:
    source: str | bytes
    if entry.raw is not None:
        raw = _raw_bytes(entry.raw)
        if raw is None:
            return Thumbnail(None, "unreadable bytes entry")
        source = raw
    elif entry.source is None:
        return Thumbnail(None, "no image path")
    elif _is_url(entry.source) and not fetch_urls:
        return Thumbnail(None, "URL not fetched")
    else:
        source = entry.source
    try:
        # Decoding to about size x size pixels first keeps this cheap for large photos.
        img = load_image(source, base_dir=images_root, max_pixels=4 * size * size, limits=_LIMITS)
        with Image.open(io.BytesIO(img.data)) as im:
            im.thumbnail((size, size), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.convert("RGB").save(buf, "JPEG", quality=THUMB_QUALITY, optimize=True)
            w, h = im.size
    except ImageError as e:
        return Thumbnail(None, _short_reason(str(e)))
    except (OSError, ValueError) as e:  # anything odd in a file must not stop the report
        return Thumbnail(None, _short_reason(f"cannot read image ({e})"))
    return Thumbnail("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), "", w, h)


def _short_reason(text: str) -> str:
    if text.startswith("file not found"):
        return "missing image"
    return text[:120]


def make_thumbnails(entries: list[Entry], images_root: str | None, *, fetch_urls: bool = False,
                    workers: int = 8) -> list[Thumbnail]:
    if not entries:
        return []
    with ThreadPoolExecutor(max(1, min(workers, len(entries))), thread_name_prefix="vlmtag-thumb") as pool:
        return list(pool.map(lambda e: make_thumbnail(e, images_root, fetch_urls=fetch_urls), entries))
