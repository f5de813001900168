"""How the local engines (HF transformers, vLLM) read `sampling_params`. Pure functions, no heavy imports.

Both engines decode greedily unless sampling is asked for. Every engine, the API one included, caps the answer at
`answer_budget` tokens: a tag list is short, and a cap is what stops a model that loops.
"""

from __future__ import annotations

from typing import Any, Mapping

from vlmtag.defaults import DEFAULT_MAX_TOKENS

#: Keys that ask for sampling when set to a value that changes anything.
_SAMPLING_KEYS = ("top_p", "top_k", "min_p", "typical_p")


def answer_budget(sampling_params: Mapping[str, Any]) -> int:
    """New tokens one answer may take: `max_new_tokens` (transformers' name), `max_tokens` (vLLM's and OpenAI's)
    or `max_completion_tokens` (OpenAI's newer name), else `DEFAULT_MAX_TOKENS`."""
    for key in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
        value = sampling_params.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return int(value)
    return DEFAULT_MAX_TOKENS


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
