"""Token and cost estimates: what a request will cost before it is sent, and what a run has spent.

Visual tokens follow Qwen2.5-VL (one token per 28×28 pixels of the image as sent); text is estimated at four
characters per token. Servers report the real counts in `usage`, which the run prefers whenever it has them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vlmtag.defaults import PIXELS_PER_TOKEN_SIDE

CHARS_PER_TOKEN = 4


def visual_tokens(width: int, height: int) -> int:
    return math.ceil(max(1, width) / PIXELS_PER_TOKEN_SIDE) * math.ceil(max(1, height) / PIXELS_PER_TOKEN_SIDE)


def text_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN


@dataclass(frozen=True)
class Pricing:
    """Prices in any currency per million tokens, as providers list them."""

    input_per_million: float = 0.0
    output_per_million: float = 0.0

    @property
    def known(self) -> bool:
        return self.input_per_million > 0 or self.output_per_million > 0

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_million + output_tokens * self.output_per_million) / 1e6
