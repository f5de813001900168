"""Reading rows in batches from JSONL, JSON (an array, as Data-Juicer writes it) and Parquet.

Files are opened with `filesystem.open_input`: plain `open` locally, fsspec for URLs. JSONL and Parquet stream
(a line / a row group at a time); a JSON array is read whole (such files are small by nature).

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

import json
from typing import Iterator

from vlmtag.io import filesystem
from vlmtag.io.base import batched, format_of
from vlmtag.rowkeys import BYTES_KEY, INVALID_ROW_KEY


def read_batches(path: str, batch_size: int) -> Iterator[list[dict]]:
    fmt = format_of(path)
    if fmt == "jsonl":
        return read_jsonl(path, batch_size)
    if fmt == "json":
        return read_json_array(path, batch_size)
    return read_parquet(path, batch_size)


def _chunks(rows: list[dict], batch_size: int) -> Iterator[list[dict]]:
    for start in range(0, len(rows), batch_size):
        yield rows[start : start + batch_size]


def read_jsonl(path: str, batch_size: int) -> Iterator[list[dict]]:
    return batched(_jsonl_rows(path), batch_size)


def _jsonl_rows(path: str) -> Iterator[dict]:
    with filesystem.open_input(path, "r") as f:
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
            yield row


def read_json_array(path: str, batch_size: int) -> Iterator[list[dict]]:
    with filesystem.open_input(path, "r") as f:
        data = json.load(f)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of objects")
    rows = [r if isinstance(r, dict) else {INVALID_ROW_KEY: {"index": i, "value": r, "error": "not a JSON object"}}
            for i, r in enumerate(data)]
    yield from _chunks(rows, batch_size)


def read_parquet(path: str, batch_size: int) -> Iterator[list[dict]]:
    import pyarrow.parquet as pq

    with filesystem.open_input(path, "rb") as f, pq.ParquetFile(f) as pf:
        attach = _image_columns(pf.schema_arrow, filesystem.basename(path))
        start = 0
        for record_batch in pf.iter_batches(batch_size=batch_size):
            rows = record_batch.to_pylist()
            if attach is not None:
                for offset, row in enumerate(rows):
                    attach(row, start + offset)
            start += len(rows)
            yield rows


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
