"""Dataset I/O: rows in, rows out, in bounded batches; shards, their readers (the table: `dataset.READERS`), writers.

Imports nothing of vlmtag's ops, engines or image decoding: image bytes pass through the rows untouched.
"""

from vlmtag.io.base import RowWriter, UnsupportedFormat, format_of
from vlmtag.io.dataset import Shard, open_dataset
from vlmtag.io.readers import read_batches
from vlmtag.io.writers import open_writer

__all__ = ["RowWriter", "Shard", "UnsupportedFormat", "format_of", "open_dataset", "open_writer", "read_batches"]
