"""Image loading: bytes from a path, URL or column, decoded, oriented, converted to RGB, downscaled, encoded once."""

from vlmtag.images.fetch import FetchLimits, ImageError, read_source
from vlmtag.images.prepare import EncodedImage, load_image, max_pixels_for_short_side, prepare_image

__all__ = [
    "EncodedImage",
    "ImageError",
    "FetchLimits",
    "load_image",
    "max_pixels_for_short_side",
    "prepare_image",
    "read_source",
]
