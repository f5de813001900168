"""From a model's raw answer to a clean tag list: parsing, normalising, and the structured-output schema."""

from vlmtag.tags.normalize import normalize_tag, normalize_tags
from vlmtag.tags.parse import TagParseError, extract_tags, parse_output
from vlmtag.tags.schema import tags_json_schema

__all__ = ["TagParseError", "extract_tags", "normalize_tag", "normalize_tags", "parse_output", "tags_json_schema"]
