"""What kind of location a string names: a URL with a scheme, or a local path. Imports nothing of vlmtag, so
every layer (io, images, ops, report) asks the same question the same way."""

from __future__ import annotations

import re

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")


def scheme_of(path: str) -> str | None:
    """`s3` for `s3://b/k`, `https` for a URL, None for a local path (a one-letter "scheme" is a Windows drive)."""
    m = _SCHEME.match(path)
    if m and len(m.group(1)) > 1:
        return m.group(1).lower()
    return None


def is_remote(path: str) -> bool:
    """A location that is not on this machine's filesystem: any `scheme://` other than `file://`."""
    return scheme_of(path) not in (None, "file")
