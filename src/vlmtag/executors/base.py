"""What every executor is given: work items (a batch of rows and where its images live)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class WorkItem:
    key: Any  # opaque to executors; handed back with the result (the run uses (shard, batch))
    rows: list[dict]
    base_dir: str | None  # relative image paths in these rows resolve against this folder


def apply_ops(ops, item: WorkItem) -> list[dict]:
    rows = item.rows
    for op in ops:
        rows = op.process_rows(rows, base_dir=item.base_dir)
    return rows
