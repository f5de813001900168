"""The parser on the messy answers real models give: exact tags out, or a TagParseError (which means retry)."""

import pytest

from vlmtag import ImageTaggingVLMMapper, TagParseError
from vlmtag.tags import normalize_tag, tags_json_schema

op = ImageTaggingVLMMapper("builtin:default")

GOOD = [
    ('{"tags": ["cat", "sofa"]}', ["cat", "sofa"]),
    ('```json\n{"tags": ["red car", "street"]}\n```', ["red-car", "street"]),
    ('Here you go:\n```\n{"tags": ["a", "b"]}\n```\nDone.', ["a", "b"]),
    ('```python\n{"tags": ["x"]}\n```', ["x"]),
    ("{'tags': ['single quotes', 'python literal']}", ["single-quotes", "python-literal"]),
    ('Sure! The tags are {"tags": ["dog", "park"]} as requested.', ["dog", "park"]),
    ('["beach", "sunset", "waves"]', ["beach", "sunset", "waves"]),
    ('{"Tags": ["Upper Key"]}', ["upper-key"]),
    ('{"TAG": "one, two , three"}', ["one", "two", "three"]),
    ('{"tag": ["only-tag"]}', ["only-tag"]),
    ('<think>I think {"tags": ["wrong"]} maybe</think>{"tags": ["right"]}', ["right"]),
    ('reasoning with {"tags": ["hidden"]}</think>\n{"tags": ["shown"]}', ["shown"]),
    ('{"tags": ["kept"]} <think>unfinished {"tags": ["never"]}', ["kept"]),
    ('<THINK>x</THINK>["caps-think"]', ["caps-think"]),
    ('```json\nnot json at all\n```\n{"tags": ["after-bad-fence"]}', ["after-bad-fence"]),
    ('{tags: broken} then {"tags": ["second"]}', ["second"]),
    ('{"tags": ["dup", "Dup", "DUP ", "d_u_p", "d u p"]}', ["dup", "d-u-p"]),
    ('{"tags": ["  --Blue_Sky!! ", "snow   capped__peak", "ｆｕｌｌ-width"]}', ["blue-sky", "snow-capped-peak", "full-width"]),
    ('{"tags": ["", "   ", "!!!", "ok"]}', ["ok"]),
    ('{"tags": [1, 2.5, true, null, {"x": 1}, "word"]}', ["1", "2.5", "word"]),
    ('{"tags": ["brace } inside", "quote \\" mark"]}', ["brace-}-inside", 'quote-"-mark']),
    ('{"tags": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"]}', list("abcdefghij")),
    ('{"tags": ["' + "x" * 51 + '", "short"]}', ["short"]),
    ('{"tags": ["' + "y" * 50 + '"]}', ["y" * 50]),
]


@pytest.mark.parametrize("raw,expected", GOOD)
def test_parse_output_gives_exact_tags(raw, expected):
    assert op.parse_output(raw) == expected


BAD = [
    ("cat, dog", "no JSON"),
    ("", "no JSON"),
    ('{"labels": ["cat"]} and then {"tags": ["dog"]}', "no 'tags' key"),
    ('{"result": {"tags": ["nested"]}}', "no 'tags' key"),
    ('{"tags": []}', "empty"),
    ('{"tags": ["!!!", "---"]}', "empty"),
    ('<think>{"tags": ["only-in-thought"]}', "no JSON"),
    ('{"tags": ["only-in-thought"]}</think>', "no JSON"),
    ('{"tags": 5}', "not a list"),
    ('{"tags": ["unclosed"', "no JSON"),
]


@pytest.mark.parametrize("raw,why", BAD)
def test_parse_output_rejects_answers_without_tags(raw, why):
    with pytest.raises(TagParseError, match=why):
        op.parse_output(raw)


def test_parse_error_is_a_value_error():
    assert issubclass(TagParseError, ValueError)


def test_max_tags_and_length_come_from_the_operator():
    small = ImageTaggingVLMMapper("builtin:default", max_tags=2, max_tag_length=5)
    assert small.parse_output('{"tags": ["toolong", "abc", "de", "fgh"]}') == ["abc", "de"]


def test_normalize_tag_rules():
    assert normalize_tag("  Hello   World ") == "hello-world"
    assert normalize_tag("snake_case-and--dash") == "snake-case-and-dash"
    assert normalize_tag("(parenthesised)") == "parenthesised"
    assert normalize_tag("café") == "café"


def test_schema_bounds_can_always_be_finished():
    schema = tags_json_schema(max_tags=7, max_tag_length=12)
    tags = schema["properties"]["tags"]
    assert tags["minItems"] == 1 and tags["maxItems"] == 7
    assert tags["items"]["pattern"] == "^[a-z0-9][a-z0-9-]{0,11}$"
    assert schema["required"] == ["tags"]
