"""The tagger as the API tests build it: pointed at a loopback `OpenAIServer`, with quick retries."""

from __future__ import annotations

from vlmtag import ImageTaggingVLMMapper


def make_op(server, *, api_key: str = "k", **kw) -> ImageTaggingVLMMapper:
    """An API tagger for `server`; keyword arguments are the operator's (they win over these defaults)."""
    kw.setdefault("retry_backoff", 0.01)
    kw.setdefault("model_params", {"base_url": server.base_url, "api_key": api_key, "timeout": 60})
    return ImageTaggingVLMMapper("test-model", is_api_model=True, **kw)
