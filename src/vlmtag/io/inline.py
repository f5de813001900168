"""Image files, folders or URLs named on the command line (`vlmtag tag PATH...`), read as one dataset shard."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator, Sequence

from vlmtag.errors import ConfigError
from vlmtag.io.base import batched
from vlmtag.io.dataset import Shard
from vlmtag.urls import scheme_of
from vlmtag.io.folder import image_paths


def inline_shard(paths: Sequence[str], base_dir: str) -> Shard:
    """One row per image; folders are walked recursively and sorted, as a folder-of-images dataset is."""
    rows = list(image_rows(paths))  # walks folders first, so a typo fails before any work
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:12]  # other files: another job
    return Shard(f"{','.join(paths)}#{digest}", "inline", base_dir, rows=lambda n: batched(rows, n))


def image_rows(paths: Sequence[str]) -> Iterator[dict]:
    for path in paths:
        if scheme_of(path) or os.path.isfile(path):  # a URL is an image; its errors are per image
            yield {"images": [path]}
        elif os.path.isdir(path):
            for rel in image_paths(path):
                yield {"images": [os.path.join(path, rel)]}
        else:
            raise ConfigError(f"{path}: no such file or folder")
