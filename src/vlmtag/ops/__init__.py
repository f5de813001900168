"""Operators (one per file) and the registry recipes look them up in."""

from vlmtag.ops.image_tagging_vlm_mapper import ImageTaggingVLMMapper, RunAborted
from vlmtag.ops.registry import get_operator, operator_names, register

__all__ = ["ImageTaggingVLMMapper", "RunAborted", "get_operator", "operator_names", "register"]
