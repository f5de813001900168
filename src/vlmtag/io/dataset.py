"""What `dataset_path` names: one file, a glob, or a folder, opened as an ordered list of shards.

A shard is the unit of input (one file, one tar, one folder of images); when the export is a folder, each
shard gets its own output part, named after it. Relative image paths in a shard's rows resolve against the
shard's folder (for a remote dataset, the URL of that folder).

What `dataset_path` may be, locally or as a URL (`s3://`, `gs://`, `https://`, ... through fsspec, see
`filesystem.py`):
- one file: `.jsonl`, `.json`, `.parquet`, or a WebDataset `.tar` (`.tar.gz`, `.tgz`);
- a glob (`data/*.jsonl`, `shards/**/*.tar`): the matching files of a known format, sorted;
- a folder holding such files (not searched recursively): each is a shard, sorted by name; if some are tars,
  only the tars (an img2dataset output folder also holds a metadata `.parquet` per tar);
- any other folder: a folder of images, walked recursively (kind "images", see `folder.py`).
A path that exists as written is never taken for a glob, so `photos [2023]/a.jsonl` works.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Callable, Iterator

from vlmtag.io import filesystem, folder, readers, webdataset
from vlmtag.io.base import (
    FORMATS,
    batched,
    IMAGE_EXTENSIONS,
    TAR_EXTENSIONS,
    ShardReadError,
    UnsupportedFormat,
)
from vlmtag.rowkeys import BYTES_KEY

__all__ = ["BYTES_KEY", "IMAGE_EXTENSIONS", "READERS", "Shard", "ShardReadError", "kind_of", "open_dataset"]

# The reader of each kind of shard: path -> its rows. Every kind is listed here, once.
READERS: dict[str, Callable[[str], Iterator[dict]]] = {
    "jsonl": readers.jsonl_rows,
    "json": readers.json_array_rows,
    "parquet": readers.parquet_rows,
    "webdataset": webdataset.webdataset_rows,
    "images": folder.image_folder_rows,
}


@dataclass(frozen=True)
class Shard:
    path: str
    kind: str  # a key of READERS: "jsonl", "json", "parquet", "webdataset", "images"; or "inline"
    base_dir: str
    rows: Callable[[int], Iterator[list[dict]]] | None = None  # for "inline" shards (rows built in memory)

    @property
    def name(self) -> str:
        return filesystem.basename(self.path) or "root"

    def batches(self, batch_size: int) -> Iterator[list[dict]]:
        """The shard's rows, `batch_size` at a time. A shard damaged part-way (a truncated tar, a JSON file that
        does not parse) ends with one unreadable row saying where; the rows before it are all there."""
        if self.rows is not None:
            return self.rows(batch_size)
        return batched(readers.guarded(READERS[self.kind](self.path), self.path), batch_size)


def kind_of(path: str) -> str | None:
    lower = filesystem.url_path(path).lower()
    if lower.endswith(TAR_EXTENSIONS):
        return "webdataset"
    return FORMATS.get(os.path.splitext(lower)[1])


def _file_shard(path: str) -> Shard:
    kind = kind_of(path)
    if kind is None:
        raise UnsupportedFormat(
            f"{path}: unsupported dataset format; expected one of {', '.join(FORMATS)}, .tar (WebDataset), "
            "a folder or a glob"
        )
    return Shard(path, kind, filesystem.dirname(path))


def _shard_files(files: list[str]) -> list[str]:
    """The data files of a folder. When it holds WebDataset tars, only those: img2dataset writes a `.parquet`
    of metadata (and a `_stats.json`) next to each tar, describing the same samples without their images."""
    tars = [f for f in files if kind_of(f) == "webdataset"]
    return tars or [f for f in files if kind_of(f)]


def _is_glob(path: str) -> bool:
    chars = "*[" if filesystem.scheme_of(path) in ("http", "https") else "*?["  # `?` starts a URL's query
    return any(c in path for c in chars)


def open_dataset(path: str) -> list[Shard]:
    """The shards of a dataset, in a stable order. Raises `FileNotFoundError` / `UnsupportedFormat`."""
    path = filesystem.local_path(path)
    if filesystem.is_remote(path):
        return _open_remote(path)
    if _is_glob(path) and not os.path.exists(path):
        matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"{path}: the pattern matches no file")
        return [_file_shard(p) for p in matches if kind_of(p)] or [_file_shard(matches[0])]
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        data_files = _shard_files([os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))])
        if data_files:
            return [_file_shard(p) for p in data_files]
        return [Shard(path, "images", os.path.abspath(path))]
    if not os.path.exists(path):
        where = "" if os.path.isabs(path) else f" (looked for {os.path.abspath(path)}: relative paths start at the current folder)"
        raise FileNotFoundError(f"{path}: no such file or folder{where}")
    return [_file_shard(path)]


def _open_remote(path: str) -> list[Shard]:
    if _is_glob(path):
        matches = filesystem.remote_glob(path)
        if not matches:
            raise FileNotFoundError(f"{path}: the pattern matches no file")
        return [_file_shard(p) for p in matches if kind_of(p)] or [_file_shard(matches[0])]
    if kind_of(path):  # a data file by its name: no listing needed (http servers often cannot list)
        return [_file_shard(path)]
    where = filesystem.remote_kind(path)
    if where == "missing":
        raise FileNotFoundError(f"{path}: no such file or folder")
    if where == "file":
        return [_file_shard(path)]  # raises UnsupportedFormat
    data_files = _shard_files([url for url, is_dir in filesystem.remote_listdir(path) if not is_dir])
    if data_files:
        return [_file_shard(p) for p in data_files]
    return [Shard(path.rstrip("/"), "images", path.rstrip("/"))]
