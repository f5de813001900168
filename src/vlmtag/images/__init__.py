"""Image loading: bytes from a path, URL or column, decoded, oriented, converted to RGB, downscaled, encoded once.

Owns reading image sources (`fetch`), decoding and re-encoding (`prepare`) and `EncodedImage` (`encoded`).
Imports nothing of vlmtag's engines, ops or io. Names load on first use, so `EncodedImage` alone costs no codec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmtag.lazy import lazy_exports

from vlmtag.images.encoded import EncodedImage

if TYPE_CHECKING:
    from vlmtag.images.fetch import FetchLimits, ImageError, read_source
    from vlmtag.images.prepare import load_image, max_pixels_for_short_side, prepare_image

# name -> the module that defines it, imported when the name is first asked for
_LAZY = {
    "FetchLimits": "vlmtag.images.fetch",
    "ImageError": "vlmtag.images.fetch",
    "read_source": "vlmtag.images.fetch",
    "load_image": "vlmtag.images.prepare",
    "max_pixels_for_short_side": "vlmtag.images.prepare",
    "prepare_image": "vlmtag.images.prepare",
}

__all__ = [
    "EncodedImage",
    "ImageError",
    "FetchLimits",
    "load_image",
    "max_pixels_for_short_side",
    "prepare_image",
    "read_source",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
