"""What readers and writers share: format detection, the file extensions, the writer interface."""

from __future__ import annotations

import abc
import itertools
import os
from typing import Iterable, Iterator

from vlmtag.atomic import atomic_path
from vlmtag.rowkeys import BYTES_KEY

FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")


class UnsupportedFormat(ValueError):
    pass


class ShardReadError(ValueError):
    """A shard could not be read to its end (a truncated or corrupt tar, ...). The message names the shard and
    the place; the rows before that place have already been yielded."""


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


class _Aborted(Exception):
    """Thrown into the temporary file's `atomic_path` to remove it."""


class RowWriter(abc.ABC):
    """Writes rows to a temporary file next to `path` (`vlmtag.atomic.atomic_path`); `commit()` renames it into
    place, `abort()` removes it, so a crash never leaves a half-written export under the real name.

    As a context manager (`with open_writer(path) as w:`) it commits when the block ends normally and aborts
    when it raises. After the first `commit()` or `abort()`, both do nothing.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._target = atomic_path(path)  # entered here, left by commit() or abort()
        self.tmp_path = self._target.__enter__()
        self.rows_written = 0

    @abc.abstractmethod
    def write(self, rows: Iterable[dict]) -> None: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    def commit(self) -> None:
        """Finish the file and rename it to `path`; on failure the temporary file is removed."""
        if self._target is None:
            return
        try:
            self._close()
        except BaseException as e:
            self._leave(e)
            raise
        self._leave(None)

    def abort(self) -> None:
        """Close and remove the temporary file; `path` is left as it was."""
        if self._target is None:
            return
        try:
            self._close()
        finally:
            self._leave(_Aborted())

    def _leave(self, error: BaseException | None) -> None:
        target, self._target = self._target, None
        if target is None:
            return
        if error is None:
            target.__exit__(None, None, None)  # renames into place
        else:
            target.__exit__(type(error), error, error.__traceback__)  # removes the temporary file

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def describe_unreadable(info: object, shard_name: str) -> str:
    """Where an unreadable row is and why, for a person: `in.jsonl line 3: invalid JSON ...`."""
    if not isinstance(info, dict):
        return f"{shard_name}: {info}"
    where = next((f"{key} {info[key]}" for key in ("line", "index", "row") if key in info), None)
    where = info.get("member") or (f"{shard_name} {where}" if where else info.get("shard") or shard_name)
    return f"{where}: {info.get('error', 'unreadable')}"


def batched(rows: Iterable[dict], batch_size: int) -> Iterator[list[dict]]:
    """Group a stream of rows into lists of `batch_size` (the last may be shorter)."""
    it = iter(rows)
    while batch := list(itertools.islice(it, batch_size)):
        yield batch
