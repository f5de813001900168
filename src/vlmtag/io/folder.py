"""A folder of images as a dataset (shard kind "images"): one row per image file.

The folder is walked recursively as a stream: each folder's files in sorted order, then its subfolders in
sorted order, so the order is stable from run to run and no list of every path is ever built. Files are kept
by extension (`IMAGE_EXTENSIONS`, case-insensitive). Hidden files and folders (a name starting with `.`) are
skipped: macOS leaves `._IMG_0001.jpg` files next to the photos that are not images. Symlinked folders are not
followed (a link loop cannot hang the walk); symlinked files are read.

Each row is `{"images": ["<path relative to the folder>"]}` with `/` separators; the shard's `base_dir` is the
folder, so the operator resolves the path. For a remote folder (`s3://...`, see `filesystem.py`) the row also
carries the image bytes under `BYTES_KEY`, read here as the walk finds each file; the operator tags those bytes
and does not fetch the path again.
"""

from __future__ import annotations

import os
from typing import Iterator

from vlmtag.io import filesystem
from vlmtag.io.base import IMAGE_EXTENSIONS
from vlmtag.rowkeys import BYTES_KEY


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def image_paths(folder: str) -> Iterator[str]:
    """Paths of the images under a local `folder`, relative to it, in the walk order described above."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(root, folder)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for name in sorted(files):
            if _is_image(name):
                yield prefix + name


def _remote_images(folder: str) -> Iterator[tuple[str, str]]:
    """(path relative to the folder, full URL) of the images under a remote folder."""
    root = folder.rstrip("/") + "/"
    for url in filesystem.remote_walk_files(folder):
        rel = url[len(root):] if url.startswith(root) else filesystem.basename(url)
        if _is_image(filesystem.basename(url)) and not any(p.startswith(".") for p in rel.split("/")):
            yield rel, url


def image_folder_rows(path: str) -> Iterator[dict]:
    if filesystem.is_remote(path):
        fs, inner = filesystem.filesystem(path)
        base = fs.unstrip_protocol(inner).rstrip("/")
        return ({"images": [rel], BYTES_KEY: [filesystem.read_bytes(url)]} for rel, url in _remote_images(base))
    return ({"images": [rel]} for rel in image_paths(path))
