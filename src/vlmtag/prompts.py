"""Default prompts and the per-image prompt text."""

from __future__ import annotations

import re

DEFAULT_SYSTEM_PROMPT = (
    "You are an image tagging assistant for building training datasets. Look at the image and give between "
    "5 and 10 short English tags that describe it: the objects and people in it, what is happening, colours, "
    "materials, visual style, mood, and the setting. Each tag is a noun or a gerund in lowercase; join the words "
    "of a multi-word tag with hyphens (for example \"red-bicycle\", \"city-street\", \"reading\"). "
    "Answer with JSON only, exactly in this form and with nothing before or after it: "
    '{"tags": ["tag-one", "tag-two"]}'
)

DEFAULT_INPUT_TEMPLATE = (
    "Tag this image. It came with this text: {text}\n"
    "Use the text only where it matches what the image shows; ignore it otherwise."
)

DEFAULT_IMAGE_TOKEN = "<__dj__image>"
DEFAULT_EOC_TOKEN = "<|__dj__eoc|>"
_SPACES = re.compile(r"\s+")


def clean_text(text: object, special_tokens: tuple[str, ...] = (DEFAULT_IMAGE_TOKEN, DEFAULT_EOC_TOKEN)) -> str:
    """The sample's text without Data-Juicer's special tokens, whitespace collapsed."""
    if not isinstance(text, str):
        return ""
    for token in special_tokens:
        if token:
            text = text.replace(token, " ")
    return _SPACES.sub(" ", text).strip()


def fill_template(template: str, text: str) -> str:
    """Put the text where `{text}` is; other braces in the template stay as written (no str.format)."""
    return template.replace("{text}", text if text else "(none)")
