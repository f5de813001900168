"""What readers and writers share: format detection and the writer interface."""

from __future__ import annotations

import abc
import itertools
import os
from typing import Iterable, Iterator

from vlmtag.rowkeys import BYTES_KEY

FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


class UnsupportedFormat(ValueError):
    pass


def format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    try:
        return FORMATS[ext]
    except KeyError:
        raise UnsupportedFormat(
            f"{path}: unsupported format {ext or '(no extension)'!r}; expected one of {', '.join(FORMATS)}"
        ) from None


def output_row(row: dict) -> dict:
    """The row as it is written: without the image bytes a reader attached (`BYTES_KEY`). Every writer calls
    this; the caller's row is never changed."""
    if BYTES_KEY in row:
        return {k: v for k, v in row.items() if k != BYTES_KEY}
    return row


class RowWriter(abc.ABC):
    """Writes rows to a temporary file next to `path`; `commit()` renames it into place, so a crash never
    leaves a half-written export under the real name."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.tmp_path = f"{path}.tmp-{os.getpid()}"
        self.rows_written = 0

    @abc.abstractmethod
    def write(self, rows: Iterable[dict]) -> None: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    def commit(self, path: str | None = None) -> None:
        """Finish the file and move it to `path` (default: the export path)."""
        self._close()
        os.replace(self.tmp_path, path or self.path)

    def abort(self) -> None:
        try:
            self._close()
        finally:
            if os.path.exists(self.tmp_path):
                os.remove(self.tmp_path)

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def batched(rows: Iterable[dict], batch_size: int) -> Iterator[list[dict]]:
    """Group a stream of rows into lists of `batch_size` (the last may be shorter)."""
    it = iter(rows)
    while batch := list(itertools.islice(it, batch_size)):
        yield batch
