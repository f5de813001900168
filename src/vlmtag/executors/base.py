"""The one interface every executor implements, and what it is given: work items (a batch of rows and where
its images live) and a pipeline of operators."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from vlmtag.ops.base import Pipeline

#: Called once per work item, strictly in input order, with the item's finished rows.
Done = Callable[["WorkItem", list[dict]], None]


@dataclass
class WorkItem:
    key: Any  # opaque to executors; handed back with the result (the run uses (shard, batch))
    rows: list[dict]
    base_dir: str | None  # relative image paths in these rows resolve against this folder


class Executor(abc.ABC):
    """Runs work items through a pipeline and hands each result to `done` in input order.

    On Ctrl-C, the items already in flight are finished and handed to `done` before the interrupt goes on, so
    their requests are not paid for twice. An exception raised by an operator (e.g. `RunAborted`) is raised
    from `run` with its type and message.
    """

    #: True when the work runs in other processes that rebuild the operators from their specs (the driver's
    #: operators then need no engine of their own); those processes open the answer cache at `cache_path`.
    builds_own_ops: bool = False

    @abc.abstractmethod
    def run(self, pipeline: Pipeline, items: Iterable[WorkItem], done: Done, *, cache_path: str | None = None) -> None:
        """Run every item; `cache_path` is where the driver's answer cache lives (None: no cache)."""
