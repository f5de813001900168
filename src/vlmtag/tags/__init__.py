"""From a model's raw answer to a clean tag list: parsing, normalising, and the structured-output schema."""

from vlmtag.tags.normalize import normalize_tag, normalize_tags
from vlmtag.tags.parse import TagParseError, extract_tags, parse_output
from vlmtag.tags.schema import tags_json_schema




def __getattr__(name: str):
    # The vocabulary pulls in optional embedding code: load it only when asked for.
    if name in ("Vocabulary", "TagMatch", "POLICIES", "DEFAULT_EMBEDDING_THRESHOLD"):
        from vlmtag.tags import vocabulary

        return getattr(vocabulary, name)
    raise AttributeError(name)


__all__ = ["Vocabulary", "TagMatch", "POLICIES", "DEFAULT_EMBEDDING_THRESHOLD", "TagParseError", "extract_tags", "normalize_tag", "normalize_tags", "parse_output", "tags_json_schema"]
