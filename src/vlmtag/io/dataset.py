"""What `dataset_path` names: one file, a glob, or a folder, opened as an ordered list of shards.

A shard is the unit of input (one file, one tar, one folder of images); when the export is a folder, each
shard gets its own output part, named after it. Relative image paths in a shard's rows resolve against the
shard's folder.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Callable, Iterator

from vlmtag.io.base import FORMATS, UnsupportedFormat
from vlmtag.rowkeys import BYTES_KEY  # noqa: F401  (readers put image bytes here)

# Readers by kind of shard: (path, batch_size) -> batches of rows. Formats register here (see readers.py).
READERS: dict[str, Callable[[str, int], Iterator[list[dict]]]] = {}
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class Shard:
    path: str
    kind: str  # a key of READERS: "jsonl", "json", "parquet", "webdataset", "images"
    base_dir: str

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip("/")) or "root"

    def batches(self, batch_size: int) -> Iterator[list[dict]]:
        return READERS[self.kind](self.path, batch_size)


def kind_of(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith(".tar"):
        return "webdataset"
    return FORMATS.get(os.path.splitext(lower)[1])


def _file_shard(path: str) -> Shard:
    kind = kind_of(path)
    if kind is None:
        raise UnsupportedFormat(
            f"{path}: unsupported dataset format; expected one of {', '.join(FORMATS)}, .tar (WebDataset), "
            "a folder or a glob"
        )
    return Shard(path, kind, os.path.dirname(os.path.abspath(path)))


def open_dataset(path: str) -> list[Shard]:
    """The shards of a dataset, in a stable order. Raises `FileNotFoundError` / `UnsupportedFormat`."""
    if any(c in path for c in "*?["):
        matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"{path}: the pattern matches no file")
        return [_file_shard(p) for p in matches if kind_of(p)] or [_file_shard(matches[0])]
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        data_files = [os.path.join(path, n) for n in names if kind_of(n) and os.path.isfile(os.path.join(path, n))]
        if data_files:
            return [_file_shard(p) for p in data_files]
        return [Shard(path, "images", os.path.abspath(path))]
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    return [_file_shard(path)]
