"""Writing rows to JSONL, JSON (an array) and Parquet, by extension."""

from __future__ import annotations

import json
from typing import Any, Iterable

from vlmtag.io.base import RowWriter, format_of, output_row


def open_writer(path: str) -> RowWriter:
    return {"jsonl": JsonlWriter, "json": JsonArrayWriter, "parquet": ParquetWriter}[format_of(path)](path)


def _default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        import base64

        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"cannot write a {type(value).__name__} to JSON")


def _dumps(row: dict) -> str:
    return json.dumps(output_row(row), ensure_ascii=False, default=_default)


class JsonlWriter(RowWriter):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._f = open(self.tmp_path, "w", encoding="utf-8")

    def write(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self._f.write(_dumps(row))
            self._f.write("\n")
            self.rows_written += 1
        self._f.flush()

    def _close(self) -> None:
        if not self._f.closed:
            self._f.close()


class JsonArrayWriter(JsonlWriter):
    """A JSON array written row by row (Data-Juicer's `.json` export)."""

    def write(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self._f.write("[\n" if self.rows_written == 0 else ",\n")
            self._f.write(_dumps(row))
            self.rows_written += 1
        self._f.flush()

    def _close(self) -> None:
        if not self._f.closed:
            self._f.write("[]\n" if self.rows_written == 0 else "\n]\n")
            self._f.close()


class ParquetWriter(RowWriter):
    """Parquet, one row group per batch. The schema comes from the first batch, with null types widened to
    strings (an all-null error list in the first batch must still accept messages later)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._writer = None
        self._schema = None

    def write(self, rows: Iterable[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [output_row(r) for r in rows]
        if not rows:
            return
        if self._writer is None:
            inferred = pa.Table.from_pylist(rows).schema
            self._schema = pa.schema([f.with_type(_widen_nulls(f.type)) for f in inferred])
            self._writer = pq.ParquetWriter(self.tmp_path, self._schema)
        extra = set().union(*(r.keys() for r in rows)) - set(self._schema.names)
        if extra:
            raise ValueError(
                f"{self.path}: rows have fields {sorted(extra)} that the first rows did not have; "
                "Parquet needs one schema (write .jsonl instead)"
            )
        self._writer.write_table(pa.Table.from_pylist(rows, schema=self._schema))
        self.rows_written += len(rows)

    def _close(self) -> None:
        import pyarrow.parquet as pq

        if self._writer is None and self._schema is None:
            import pyarrow as pa

            pq.write_table(pa.table({}), self.tmp_path)
            self._schema = pa.schema([])
        elif self._writer is not None:
            self._writer.close()
            self._writer = None


def _widen_nulls(t):
    import pyarrow as pa

    if pa.types.is_null(t):
        return pa.string()
    if pa.types.is_list(t):
        return pa.list_(_widen_nulls(t.value_type))
    if pa.types.is_large_list(t):
        return pa.large_list(_widen_nulls(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_widen_nulls(f.type)) for f in t])
    return t
