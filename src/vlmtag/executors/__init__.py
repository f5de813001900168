"""Where the work runs, apart from what the work is: executors feed batches of rows through a pipeline of
operators (`base.Executor`): `local` (threads in this process), `processes` (`np` worker processes), `ray`
(a Ray Data actor pool). They know nothing of datasets, jobs or what the operators do; they must not import
`run`, `io`, `cli` or a concrete operator.
"""

from __future__ import annotations

import logging

from vlmtag.executors.base import Done, Executor, WorkItem
from vlmtag.executors.local import LocalExecutor
from vlmtag.ops.base import Pipeline

__all__ = ["Done", "Executor", "LocalExecutor", "WorkItem", "choose_executor"]

log = logging.getLogger(__name__)


def choose_executor(pipeline: Pipeline, *, executor_type: str = "default", np: int = 1,
                    ray_address: str | None = "auto") -> Executor:
    """`executor_type: ray` -> Ray Data; `np` > 1 -> that many processes, except for API engines (one process
    already keeps `concurrency` requests in flight); else the local executor."""
    if executor_type == "ray":
        from vlmtag.executors.ray import RayExecutor

        return RayExecutor(ray_address, np=np)
    if np > 1:
        if any(op.resources.is_api for op in pipeline):
            log.warning("np=%d is not used with an API engine: one process keeps `concurrency` requests in flight "
                        "(raise `concurrency` instead)", np)
        else:
            from vlmtag.executors.processes import ProcessExecutor

            return ProcessExecutor(workers=np)
    return LocalExecutor()
