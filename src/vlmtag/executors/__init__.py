"""Where the work runs, apart from what the work is: executors feed batches of rows through operators."""

from vlmtag.executors.base import WorkItem, apply_ops
from vlmtag.executors.local import run_local

__all__ = ["WorkItem", "apply_ops", "run_local"]
