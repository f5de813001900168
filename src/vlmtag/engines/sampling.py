"""How the local engines (HF transformers, vLLM) read `sampling_params`. Pure functions, no heavy imports.

Both engines decode greedily unless sampling is asked for, and both cap the answer at a small number of new
tokens when the recipe gives no cap: a tag list is short, and a cap is what stops a model that loops.
"""

from __future__ import annotations

from typing import Any, Mapping

#: New tokens per answer when `sampling_params` sets neither `max_new_tokens` nor `max_tokens`.
#: Ten tags of a few words each take ~60-100 tokens of JSON; 256 leaves room and still bounds a loop.
DEFAULT_MAX_NEW_TOKENS = 256

#: Keys that ask for sampling when set to a value that changes anything.
_SAMPLING_KEYS = ("top_p", "top_k", "min_p", "typical_p")


def max_new_tokens_of(sampling_params: Mapping[str, Any], default: int = DEFAULT_MAX_NEW_TOKENS) -> int:
    """The answer budget: `max_new_tokens` (transformers' name) or `max_tokens` (vLLM/OpenAI's), else `default`."""
    for key in ("max_new_tokens", "max_tokens"):
        value = sampling_params.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return int(value)
    return default


def wants_sampling(sampling_params: Mapping[str, Any]) -> bool:
    """True when the recipe asks for sampling rather than greedy decoding.

    An explicit `do_sample` wins; then `temperature` (0 means greedy, > 0 sampling); then any of `top_p` < 1,
    `top_k` > 0, `min_p` > 0, `typical_p` < 1. Nothing set means greedy.
    """
    if "do_sample" in sampling_params and sampling_params["do_sample"] is not None:
        return bool(sampling_params["do_sample"])
    temperature = sampling_params.get("temperature")
    if isinstance(temperature, (int, float)):
        return temperature > 0
    for key in _SAMPLING_KEYS:
        value = sampling_params.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key in ("top_p", "typical_p") and value < 1:
            return True
        if key in ("top_k", "min_p") and value > 0:
            return True
    return False
