"""The JSON schema for `{"tags": [...]}` used for structured output.

Every bound is one a constrained decoder can always finish: at least one item, at most `max_tags`, and each
tag's length bounded INSIDE its regex (xgrammar ignores `maxLength` next to a `pattern`, and an unbounded
pattern lets a greedy model run until the token budget ends).
"""

from __future__ import annotations

from typing import Any


def tag_pattern(max_tag_length: int) -> str:
    return f"^[a-z0-9][a-z0-9-]{{0,{max_tag_length - 1}}}$"


def tags_json_schema(max_tags: int = 10, max_tag_length: int = 50, enum: list[str] | None = None) -> dict[str, Any]:
    """The schema; with `enum`, each tag must be one of those terms (no pattern: terms may hold other characters)."""
    item: dict[str, Any] = {"type": "string", "enum": list(enum)} if enum else {
        "type": "string", "pattern": tag_pattern(max_tag_length)}
    return {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": item,
                "minItems": 1,
                "maxItems": max_tags,
            }
        },
        "required": ["tags"],
        "additionalProperties": False,
    }
