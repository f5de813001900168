"""The answer cache: a model's raw answer per (image bytes, everything that changes the answer).

`AnswerCache` is the interface the operator sees; `SqliteAnswerCache` is the implementation executors attach
(loaded, with sqlite3, on first use). Imports nothing of vlmtag: every layer above may use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmtag.cache.base import AnswerCache
from vlmtag.lazy import lazy_exports

if TYPE_CHECKING:
    from vlmtag.cache.sqlite import SqliteAnswerCache

__all__ = ["AnswerCache", "SqliteAnswerCache"]

__getattr__, __dir__ = lazy_exports(__name__, {"SqliteAnswerCache": "vlmtag.cache.sqlite"})
