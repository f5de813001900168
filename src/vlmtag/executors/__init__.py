"""Where the work runs, apart from what the work is: executors feed batches of rows through operators."""

from vlmtag.executors.local import run_local

__all__ = ["run_local"]
