"""Image loading: bytes from a path, URL or column, decoded, oriented, converted to RGB, downscaled, encoded once."""

from vlmtag.images.prepare import EncodedImage, ImageError, load_image, prepare_image
from vlmtag.images.fetch import FetchLimits, read_source

__all__ = ["EncodedImage", "ImageError", "FetchLimits", "load_image", "prepare_image", "read_source"]
