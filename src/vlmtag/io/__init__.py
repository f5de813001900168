"""Dataset I/O: rows in, rows out, in bounded batches. The format comes from the file extension."""

from vlmtag.io import readers as _readers  # noqa: F401  (registers the file formats)
from vlmtag.io.base import RowWriter, UnsupportedFormat, format_of
from vlmtag.io.dataset import Shard, open_dataset
from vlmtag.io.readers import read_batches
from vlmtag.io.writers import open_writer

__all__ = ["RowWriter", "Shard", "UnsupportedFormat", "format_of", "open_dataset", "open_writer", "read_batches"]
