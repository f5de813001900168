"""STUB - being written. Reading raw image bytes from a local path or an http(s) URL, with limits."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FetchLimits:
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    max_bytes: int = 50 * 1024 * 1024


def read_source(source: str, *, base_dir: str | None = None, limits: FetchLimits = FetchLimits()) -> bytes:
    import os
    from vlmtag.images.prepare import ImageError
    path = source if os.path.isabs(source) or base_dir is None else os.path.join(base_dir, source)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageError(f"cannot read {source}: {e.strerror}") from None
