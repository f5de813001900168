"""One machine, one process: batches go through the operators with a few in flight at once.

Keeping more than one batch in flight matters for API engines: while one batch waits for its slowest
request (or a retry), the next is already reading images and sending requests, so the server never idles
at a batch boundary. Results are written strictly in input order.
"""

from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Sequence


def run_local(
    ops: Sequence,
    batches: Iterable[list[dict]],
    write: Callable[[list[dict]], None],
    *,
    base_dir: str | None,
    depth: int = 2,
) -> None:
    """Run every batch through `ops` in order and hand each result to `write`, in input order."""

    def work(rows: list[dict]) -> list[dict]:
        for op in ops:
            rows = op.process_rows(rows, base_dir=base_dir)
        return rows

    pending: collections.deque[Future] = collections.deque()
    pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="vlmtag-batch")
    try:
        for batch in batches:
            pending.append(pool.submit(work, batch))
            while len(pending) >= depth:
                write(pending.popleft().result())
        while pending:
            write(pending.popleft().result())
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
