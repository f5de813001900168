"""One machine, `np` processes: for CPU-bound work (decoding and resizing images, the embedded model, a local
model per process), where threads in one process would queue behind the GIL.

Each worker process (spawned, not forked: engines hold threads, sockets and sometimes CUDA state) rebuilds the
operators from their specs once and opens the answer cache at the driver's path (SQLite in WAL mode is safe for
several processes on one machine). The driver keeps about 2 x np batches in flight, hands results to `done`
strictly in input order and adds each batch's counters to its own operators. API engines gain nothing from
processes (one process keeps `concurrency` requests in flight); the run picks the local executor for them.
"""

from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.util
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Callable, Iterable, Sequence

from vlmtag.executors.base import WorkItem
from vlmtag.executors.worker import OpWorker, WorkerResult, cache_path, merge_stats, op_specs, portable, release_engines

_worker: OpWorker | None = None
_init_error: BaseException | None = None


def _init_worker(specs: list, cache: str | None) -> None:
    # Ctrl-C reaches every process of the terminal's group: the driver decides, workers finish their batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _worker, _init_error
    try:
        _worker = OpWorker(specs, cache)
    except Exception as e:  # reported with the first batch, as the same exception type
        _init_error = portable(e)
        return
    multiprocessing.util.Finalize(_worker, _worker.close, exitpriority=10)


def _run_item(rows: list[dict], base_dir: str | None) -> WorkerResult:
    if _worker is None:
        return WorkerResult(error=_init_error or RuntimeError("worker process did not start"))
    return _worker.run(rows, base_dir)


def run_processes(
    ops: Sequence,
    items: Iterable[WorkItem],
    done: Callable[[WorkItem, list[dict]], None],
    *,
    workers: int,
    depth: int | None = None,
) -> None:
    """Run every item through copies of `ops` in `workers` processes; `done` gets each result in input order.

    At most `depth` (default 2 x workers) items are in flight, so memory stays flat however long `items` is.
    On Ctrl-C the batches already handed to workers are finished and passed to `done` before the interrupt
    goes on. An exception in a worker (e.g. `RunAborted`) is raised here with its type and message.
    """
    depth = depth or 2 * workers
    specs, cache = op_specs(ops), cache_path(ops)
    release_engines(ops)
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(specs, cache),
    )
    pending: collections.deque[tuple[WorkItem, Future]] = collections.deque()

    def finish(item: WorkItem, future: Future) -> None:
        result: WorkerResult = future.result()
        merge_stats(ops, result)
        if result.error is not None:
            raise result.error
        done(item, result.rows)

    try:
        for item in items:
            pending.append((item, pool.submit(_run_item, item.rows, item.base_dir)))
            while len(pending) >= depth:
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())
    except KeyboardInterrupt:
        for _, future in pending:
            future.cancel()  # only those no worker has taken yet
        while pending:
            item, future = pending.popleft()
            if future.cancelled():
                continue
            try:
                finish(item, future)
            except Exception:
                pass  # a failed batch is simply not finished; the rerun does it
        raise
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        for _, future in pending:  # batches finished but not handed over (an error stopped the run): count them
            if future.done() and not future.cancelled() and future.exception() is None:
                merge_stats(ops, future.result())
