"""Reading rows in batches from JSONL, JSON (an array, as Data-Juicer writes it) and Parquet.

Files are opened with `filesystem.open_input`: plain `open` locally, fsspec for URLs. JSONL and Parquet stream
(a line / a row group at a time); a JSON array is read whole (such files are small by nature). Text is UTF-8, a
leading byte-order mark skipped; anything else is an error naming the file and the byte offset, never a guess.
Every reader yields rows; `dataset.Shard.batches` batches them and ends a damaged shard with one unreadable row
(`guarded`), so the run goes on.

Parquet image columns holding bytes, as Hugging Face `datasets` writes its `Image` feature: a struct with a
binary `bytes` field (and usually a string `path`), one per row, or a list of them. They are found from the
schema. When the file has no `images` column, each row gets one:
- `"<file name>#<row>"` for an image in a single-image column (`<row>`: the row's 0-based index in the file),
  `"<file name>#<row>/<i>"` for the i-th element of a list column; with several image columns the column's name
  is added (`"<file name>#<row>/<column>"`, `"<file name>#<row>/<column>/<i>"`). The reference always names
  where the bytes were read from; the struct's own `path` (often just the original file name, which may not
  exist here) stays visible in the column, which is left in the row unchanged;
- the bytes under `BYTES_KEY`, aligned with `images`.
A struct whose `bytes` is null but whose `path` is set (a `datasets` Image column with files on disk) gives that
`path` as the `images` entry (resolved like any image path, against the file's folder) and `None` as its bytes.
A null struct (no image) gives no entry. When the file's own `images` column holds such structs, `images` is
left as it is and `BYTES_KEY` is added aligned with it. When `images` holds anything else (paths, URLs), the
row is left alone: the file says where its images are.
"""

from __future__ import annotations

import codecs
import json
import logging
from typing import Iterator

from vlmtag.io import filesystem
from vlmtag.io.base import ShardReadError, batched, format_of
from vlmtag.rowkeys import BYTES_KEY, INVALID_ROW_KEY

log = logging.getLogger(__name__)


def read_batches(path: str, batch_size: int) -> Iterator[list[dict]]:
    """The rows of one data file (an export, say), `batch_size` at a time; a damaged file raises
    `ShardReadError`."""
    rows = {"jsonl": jsonl_rows, "json": json_array_rows, "parquet": parquet_rows}[format_of(path)](path)
    return batched(rows, batch_size)


def jsonl_rows(path: str) -> Iterator[dict]:
    """One row per non-blank line. A line that is not UTF-8 or not a JSON object is kept, in place, as an
    unreadable row saying why (no input row is ever lost, and nothing is guessed or replaced). A byte-order mark
    at the start of the file (Notepad, Excel, PowerShell 5 write one) is skipped."""
    offset = 0  # of the line in the file, in bytes
    with filesystem.open_input(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield unreadable_row(lineno, raw.decode("utf-8", "backslashreplace").rstrip("\r\n"),
                                     not_utf8(path, raw, start, e))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                yield unreadable_row(lineno, line.rstrip("\r\n"), f"invalid JSON on line {lineno}: {e}")
                continue
            if not isinstance(row, dict):
                yield unreadable_row(lineno, line.rstrip("\r\n"), f"line {lineno} is not a JSON object")
                continue
            yield row


def unreadable_row(lineno: int, text: str, reason: str) -> dict:
    return {INVALID_ROW_KEY: {"line": lineno, "text": text, "error": reason}}


def not_utf8(path: str, raw: bytes, start: int, e: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8: the file, the byte and its offset in the file."""
    return (f"{filesystem.basename(path)} is not UTF-8: byte 0x{raw[e.start]:02x} at byte offset {start + e.start} "
            "of the file (save it as UTF-8)")


def json_array_rows(path: str) -> Iterator[dict]:
    """The objects of a JSON array (as Data-Juicer writes it), read whole: such files are small by nature. An
    element that is not an object is kept as an unreadable row."""
    with filesystem.open_input(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is skipped
    except UnicodeDecodeError as e:
        raise ShardReadError(f"{path}: {not_utf8(path, raw, 0, e)}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ShardReadError(f"{path}: not valid JSON: {e}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ShardReadError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, r in enumerate(data):
        yield r if isinstance(r, dict) else {INVALID_ROW_KEY: {"index": i, "value": r, "error": "not a JSON object"}}


def parquet_rows(path: str) -> Iterator[dict]:
    """Row group by row group. A row group that cannot be read is skipped, and each of its rows is kept as an
    unreadable row (the file's metadata says how many there were), so rows in = rows out."""
    import pyarrow.parquet as pq

    with filesystem.open_input(path, "rb") as f, pq.ParquetFile(f) as pf:
        attach = _image_columns(pf.schema_arrow, filesystem.basename(path))
        start = 0
        for group in range(pf.num_row_groups):
            expected = pf.metadata.row_group(group).num_rows
            done = 0
            try:
                for record_batch in pf.iter_batches(batch_size=1024, row_groups=[group]):
                    for row in record_batch.to_pylist():
                        if attach is not None:
                            attach(row, start + done)
                        done += 1
                        yield row
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid/ArrowIOError are among these
                reason = f"{filesystem.basename(path)}: row group {group} cannot be read: {str(e).splitlines()[0]}"
                log.warning("%s; its %d rows are kept as unreadable rows", reason, expected - done)
                for k in range(done, expected):
                    yield {INVALID_ROW_KEY: {"row": start + k, "error": reason}}
            start += expected


def guarded(rows: Iterator[dict], path: str) -> Iterator[dict]:
    """`rows`, and when the file turns out to be damaged (`ShardReadError`), one unreadable row saying where:
    the rows before the damage go on to be tagged, the run goes on with the next shard, and a rerun reads the same
    rows again (it never loops on the damage)."""
    try:
        yield from rows
    except ShardReadError as e:
        log.warning("damaged shard: %s; the rows before the damage are kept, the rest is recorded as one unreadable "
                    "row", e)
        yield {INVALID_ROW_KEY: {"shard": filesystem.basename(path), "error": str(e)}}


def _is_image_struct(t) -> bool:
    import pyarrow as pa

    if not pa.types.is_struct(t) or t.get_field_index("bytes") < 0:
        return False
    inner = t.field("bytes").type
    return pa.types.is_binary(inner) or pa.types.is_large_binary(inner)


def _image_column_kind(t) -> str | None:
    """"one" for an image struct, "list" for a list of them, else None."""
    import pyarrow as pa

    if _is_image_struct(t):
        return "one"
    if (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and _is_image_struct(
        t.value_type
    ):
        return "list"
    return None


def _image_columns(schema, file_name: str):
    """A function that adds `images` / `BYTES_KEY` to a row (by its index in the file), or None."""
    columns = [(f.name, kind) for f in schema if (kind := _image_column_kind(f.type))]
    if "images" in schema.names:
        if not any(name == "images" for name, _ in columns):
            return None

        def attach_own(row: dict, index: int) -> None:
            value = row.get("images")
            if value is None:
                return
            structs = value if isinstance(value, list) else [value]
            row[BYTES_KEY] = [s.get("bytes") if isinstance(s, dict) else None for s in structs]

        return attach_own
    if not columns:
        return None
    named = len(columns) > 1

    def attach(row: dict, index: int) -> None:
        images: list[str] = []
        data: list[bytes | None] = []
        for name, kind in columns:
            value = row.get(name)
            items = [(None, value)] if kind == "one" else list(enumerate(value or []))
            for i, s in items:
                if not isinstance(s, dict):
                    continue
                if s.get("bytes") is not None:
                    where = "/".join(str(p) for p in (index, name if named else None, i) if p is not None)
                    images.append(f"{file_name}#{where}")
                    data.append(s["bytes"])
                elif isinstance(s.get("path"), str) and s["path"]:
                    images.append(s["path"])
                    data.append(None)
        row["images"] = images
        if images:
            row[BYTES_KEY] = data

    return attach
