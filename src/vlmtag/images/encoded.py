"""`EncodedImage`, the prepared image every engine receives. Standard library only, so code that handles
prepared images (engines, requests) does not load the decoders in `prepare.py`."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EncodedImage:
    """An image ready to send: encoded bytes, their true MIME type and pixel size."""

    data: bytes = field(repr=False)
    mime: str
    width: int
    height: int
    source_sha256: str = ""  # hex SHA-256 of the original raw bytes (a cache key); "" when unknown

    def data_url(self) -> str:
        return f"data:{self.mime};base64," + base64.b64encode(self.data).decode("ascii")
