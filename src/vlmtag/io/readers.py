"""Reading rows in batches from JSONL, JSON (an array, as Data-Juicer writes it) and Parquet."""

from __future__ import annotations

import json
from typing import Iterator

from vlmtag.io.base import format_of
from vlmtag.io.dataset import READERS

from vlmtag.rowkeys import INVALID_ROW_KEY


def read_batches(path: str, batch_size: int) -> Iterator[list[dict]]:
    fmt = format_of(path)
    if fmt == "jsonl":
        return _jsonl(path, batch_size)
    if fmt == "json":
        return _json_array(path, batch_size)
    return _parquet(path, batch_size)


def _chunks(rows: list[dict], batch_size: int) -> Iterator[list[dict]]:
    for start in range(0, len(rows), batch_size):
        yield rows[start : start + batch_size]


def _jsonl(path: str, batch_size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                row = None
                reason = f"invalid JSON on line {lineno}: {e}"
            else:
                reason = f"line {lineno} is not a JSON object"
            if not isinstance(row, dict):
                # Keep the line, so no input row is ever lost; the row carries why it was not tagged.
                row = {INVALID_ROW_KEY: {"line": lineno, "text": line.rstrip("\n"), "error": reason}}
            batch.append(row)
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def _json_array(path: str, batch_size: int) -> Iterator[list[dict]]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of objects")
    rows = [r if isinstance(r, dict) else {INVALID_ROW_KEY: {"index": i, "value": r, "error": "not a JSON object"}}
            for i, r in enumerate(data)]
    yield from _chunks(rows, batch_size)


def _parquet(path: str, batch_size: int) -> Iterator[list[dict]]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as pf:
        for record_batch in pf.iter_batches(batch_size=batch_size):
            yield record_batch.to_pylist()


READERS.update(jsonl=_jsonl, json=_json_array, parquet=_parquet)
