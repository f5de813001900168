"""The answer cache: a model's raw answer per (image bytes, everything that changes the answer).

`AnswerCache` is the interface the operator sees; `SqliteAnswerCache` is the implementation executors attach.
"""

from vlmtag.cache.base import AnswerCache
from vlmtag.cache.sqlite import SqliteAnswerCache

__all__ = ["AnswerCache", "SqliteAnswerCache"]
