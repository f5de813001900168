"""From a model's raw answer to a clean tag list: parsing, normalising, the structured-output schema, and
controlled vocabularies. Imports nothing of vlmtag but itself and two leaf modules that import no vlmtag code,
`vlmtag.errors` and `vlmtag.atomic` (the vocabulary's, loaded on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmtag.tags.normalize import normalize_tag, normalize_tags
from vlmtag.tags.parse import TagParseError, extract_tags, parse_output
from vlmtag.tags.schema import tags_json_schema

if TYPE_CHECKING:
    from vlmtag.tags.vocabulary import DEFAULT_EMBEDDING_THRESHOLD, POLICIES, TagMatch, Vocabulary


def __getattr__(name: str):
    # The vocabulary pulls in optional embedding code: load it only when asked for.
    if name in ("Vocabulary", "TagMatch", "POLICIES", "DEFAULT_EMBEDDING_THRESHOLD"):
        from vlmtag.tags import vocabulary

        return getattr(vocabulary, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Vocabulary", "TagMatch", "POLICIES", "DEFAULT_EMBEDDING_THRESHOLD", "TagParseError", "extract_tags",
           "normalize_tag", "normalize_tags", "parse_output", "tags_json_schema"]
