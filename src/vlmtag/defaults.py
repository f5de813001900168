"""Defaults that several layers fall back on, each written once here. Imports nothing.

`DEFAULT_MAX_TOKENS` is the answer budget: new tokens per answer when `sampling_params` sets neither
`max_tokens` nor `max_new_tokens`. Every engine sends or applies it, the cost guard and the dry run count with it.
A list of ten tags is about 60–100 tokens of JSON; 256 leaves room and still bounds a model that loops.
"""

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
#: Qwen2.5-VL sees one visual token per 28x28 pixels.
PIXELS_PER_TOKEN_SIDE = 28
#: 1,024 visual tokens of 28x28 pixels: what Qwen2.5-VL's processor allows by default.
DEFAULT_MAX_PIXELS = 1024 * PIXELS_PER_TOKEN_SIDE * PIXELS_PER_TOKEN_SIDE
DEFAULT_MAX_TOKENS = 256
