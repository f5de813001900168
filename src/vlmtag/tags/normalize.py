"""Tag normalisation: one canonical spelling per tag, in the model's order."""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable

_SEPARATORS = re.compile(r"[\s_\-]+")


def normalize_tag(tag: str) -> str:
    """NFKC, lowercase, trim; runs of whitespace/`_`/`-` become one `-`; non-alphanumerics trimmed from both ends."""
    t = unicodedata.normalize("NFKC", tag).lower().strip()
    t = _SEPARATORS.sub("-", t)
    start, end = 0, len(t)
    while start < end and not t[start].isalnum():
        start += 1
    while end > start and not t[end - 1].isalnum():
        end -= 1
    return t[start:end]


def normalize_tags(tags: Iterable[str], *, max_tags: int = 10, max_tag_length: int = 50) -> list[str]:
    """Normalise each tag; drop empty and over-long ones (never cut them), then duplicates; keep the first `max_tags`."""
    out: list[str] = []
    seen: set[str] = set()
    for raw in tags:
        t = normalize_tag(raw)
        if not t or len(t) > max_tag_length or t in seen:
            continue
        seen.add(t)
        out.append(t)
        if len(out) == max_tags:
            break
    return out
