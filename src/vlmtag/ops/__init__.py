"""Operators: rows in, the same rows out with the operator's fields set. One operator per file, the registry
recipes look them up in, and the interface everything above uses (`base.Operator`, `base.Pipeline`).

An operator opens no dataset and knows no executor, job or cache file: ops must not import vlmtag.io,
vlmtag.executors, vlmtag.run, vlmtag.cache.sqlite, ray, vlmtag.report or vlmtag.cli.
"""

from vlmtag.ops.fail_fast import RunAborted
from vlmtag.ops.image_tagging_vlm_mapper import ImageTaggingVLMMapper
from vlmtag.ops.registry import get_operator, operator_names, register

__all__ = ["ImageTaggingVLMMapper", "RunAborted", "get_operator", "operator_names", "register"]
