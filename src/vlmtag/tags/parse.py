"""Getting the tags out of a model's answer, however it was wrapped.

Rules (in order): drop `<think>` blocks; prefer a ``` fence whose body parses; otherwise the first balanced
`{...}`/`[...]` span (by start position) that parses as JSON or a Python literal decides. An object without a
`tags`/`tag` key means the answer has no tags: we do not look inside it for another span.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any, Iterator

from vlmtag.tags.normalize import normalize_tags

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[^\n`]*\n?(.*?)```", re.DOTALL)
_OPEN_CLOSE = {"{": "}", "[": "]"}
_NO_VALUE = object()
# Long answers are a repetition loop, not a tag list worth an O(n^2) scan.
_MAX_SCAN_CHARS = 20_000


class TagParseError(ValueError):
    """No tags could be read from the answer (the operator retries on this)."""


def strip_thinking(text: str) -> str:
    text = _THINK_BLOCK.sub("", text)
    lower = text.lower()
    close = lower.rfind("</think>")
    if close != -1:  # a lone closing tag: the reasoning before it had no opening tag
        text = text[close + len("</think>") :]
        lower = text.lower()
    open_ = lower.find("<think>")
    if open_ != -1:  # never closed: everything after it is unfinished reasoning
        text = text[:open_]
    return text


def _loads(s: str) -> Any:
    """JSON, else a Python literal (models often answer `{'tags': ['a']}`); `_NO_VALUE` when neither."""
    try:
        return json.loads(s)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _NO_VALUE


def _balanced_end(text: str, start: int) -> int:
    """Index one past the bracket closing `text[start]`, honouring quoted strings; -1 if it never closes."""
    stack = [_OPEN_CLOSE[text[start]]]
    quote: str | None = None
    i = start + 1
    n = len(text)
    while i < n:
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in _OPEN_CLOSE:
            stack.append(_OPEN_CLOSE[c])
        elif c in "}]":
            if c != stack.pop():
                return -1
            if not stack:
                return i + 1
        i += 1
    return -1


def _spans(text: str) -> Iterator[str]:
    for start, c in enumerate(text):
        if c in _OPEN_CLOSE:
            end = _balanced_end(text, start)
            if end != -1:
                yield text[start:end]


def _first_structure(text: str) -> Any:
    for m in _FENCE.finditer(text):
        value = _loads(m.group(1).strip())
        if isinstance(value, (dict, list)):
            return value
    for span in _spans(text[:_MAX_SCAN_CHARS]):
        value = _loads(span)
        if isinstance(value, (dict, list)):
            return value
    raise TagParseError("no JSON in answer")


def _as_text(item: Any) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, (int, float)) and not isinstance(item, bool):
        return str(item)
    return None


def extract_tags(raw: str) -> list[str]:
    """The raw (un-normalised) tag strings in the answer, in the model's order."""
    if not isinstance(raw, str):
        raise TagParseError(f"answer is {type(raw).__name__}, not text")
    value = _first_structure(strip_thinking(raw))
    if isinstance(value, dict):
        by_key = {str(k).lower(): v for k, v in reversed(list(value.items()))}
        key = "tags" if "tags" in by_key else "tag" if "tag" in by_key else None
        if key is None:
            raise TagParseError("JSON answer has no 'tags' key")
        value = by_key[key]
    if isinstance(value, str):
        return value.split(",")
    if not isinstance(value, list):
        raise TagParseError(f"'tags' is {type(value).__name__}, not a list")
    return [t for t in map(_as_text, value) if t is not None]


def parse_output(raw: str, *, max_tags: int = 10, max_tag_length: int = 50) -> list[str]:
    """Normalised tags from a raw answer; `TagParseError` when there are none."""
    tags = normalize_tags(extract_tags(raw), max_tags=max_tags, max_tag_length=max_tag_length)
    if not tags:
        raise TagParseError("answer has an empty tag list")
    return tags
