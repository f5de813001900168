"""One machine, one process: batches go through the operators with a few in flight at once.

Keeping more than one batch in flight matters for API engines: while one batch waits for its slowest
request (or a retry), the next is already reading images and sending requests, so the server never idles
at a batch boundary. Results are handed back strictly in input order.
"""

from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable

from vlmtag.executors.base import Done, Executor, WorkItem
from vlmtag.ops.base import Pipeline


class LocalExecutor(Executor):
    def __init__(self, depth: int = 2) -> None:
        self.depth = depth

    def run(self, pipeline: Pipeline, items: Iterable[WorkItem], done: Done, *, cache_path: str | None = None) -> None:
        def work(item: WorkItem) -> list[dict]:
            return pipeline.process_rows(item.rows, base_dir=item.base_dir)

        pending: collections.deque[tuple[WorkItem, Future]] = collections.deque()
        pool = ThreadPoolExecutor(max_workers=self.depth, thread_name_prefix="vlmtag-batch")
        try:
            for item in items:
                pending.append((item, pool.submit(work, item)))
                while len(pending) >= self.depth:
                    item, future = pending.popleft()
                    done(item, future.result())
            while pending:
                item, future = pending.popleft()
                done(item, future.result())
        except KeyboardInterrupt:
            while pending:
                item, future = pending.popleft()
                if future.exception() is None:
                    done(item, future.result())
            raise
        finally:
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
