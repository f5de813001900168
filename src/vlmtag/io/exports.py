"""Reading an export back: one file, or a folder export's parts in name order."""

from __future__ import annotations

import os
from typing import Iterator

from vlmtag.errors import ConfigError
from vlmtag.io.base import UnsupportedFormat, format_of
from vlmtag.io.readers import read_batches


def iter_export_rows(path: str) -> Iterator[dict]:
    """The export's rows one at a time: JSONL line by line, Parquet batch by batch, a JSON array all at once."""
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such export file")
    if os.path.isdir(path):  # a folder export: its parts, in name order (one per input shard)
        parts = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if os.path.splitext(n)[1].lower() in (".jsonl", ".json", ".parquet"))
        if not parts:
            raise ConfigError(f"{path}: a folder with no export parts (.jsonl, .json or .parquet) in it")
        for part in parts:
            yield from iter_export_rows(part)
        return
    try:
        format_of(path)
    except UnsupportedFormat as e:
        raise ConfigError(str(e)) from None
    try:
        for batch in read_batches(path, 512):
            yield from batch
    except (ValueError, OSError) as e:  # a JSON array that does not parse, a broken Parquet file
        raise ConfigError(f"{path}: cannot read the export ({str(e)[:200]})") from None
    except Exception as e:  # pyarrow's own errors
        if type(e).__module__.startswith("pyarrow"):
            raise ConfigError(f"{path}: cannot read the export ({str(e)[:200]})") from None
        raise
