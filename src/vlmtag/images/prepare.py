"""STUB - being written. Decode, orient, RGB, downscale to max_pixels, encode once."""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass


class ImageError(ValueError):
    """A per-image failure with a short, clear reason (str(e))."""


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    mime: str
    width: int
    height: int

    def data_url(self) -> str:
        return f"data:{self.mime};base64," + base64.b64encode(self.data).decode("ascii")


def prepare_image(raw: bytes, *, max_pixels: int = 802_816) -> EncodedImage:
    from PIL import Image
    try:
        im = Image.open(io.BytesIO(raw))
        im = im.convert("RGB")
    except Exception as e:  # stub
        raise ImageError(f"not a readable image: {e}") from None
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return EncodedImage(buf.getvalue(), "image/jpeg", im.width, im.height)


def load_image(source, *, base_dir=None, max_pixels: int = 802_816, limits=None) -> EncodedImage:
    from vlmtag.images.fetch import FetchLimits, read_source
    raw = source if isinstance(source, (bytes, bytearray)) else read_source(source, base_dir=base_dir, limits=limits or FetchLimits())
    return prepare_image(bytes(raw), max_pixels=max_pixels)
