"""One machine, one process: batches go through the operators with a few in flight at once.

Keeping more than one batch in flight matters for API engines: while one batch waits for its slowest
request (or a retry), the next is already reading images and sending requests, so the server never idles
at a batch boundary. Results are handed back strictly in input order.
"""

from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Sequence

from vlmtag.executors.base import WorkItem, apply_ops


def run_local(
    ops: Sequence,
    items: Iterable[WorkItem],
    done: Callable[[WorkItem, list[dict]], None],
    *,
    depth: int = 2,
) -> None:
    """Run every item through `ops` and hand each result to `done`, in input order.

    On Ctrl-C, the batches already in flight are finished and handed over before the interrupt goes on,
    so their requests are not paid for twice.
    """
    pending: collections.deque[tuple[WorkItem, Future]] = collections.deque()
    pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="vlmtag-batch")
    try:
        for item in items:
            pending.append((item, pool.submit(apply_ops, ops, item)))
            while len(pending) >= depth:
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
