"""One machine, `np` processes: for CPU-bound work (decoding and resizing images, the embedded model, a local
model per process), where threads in one process would queue behind the GIL.

Each worker process (spawned, not forked: engines hold threads, sockets and sometimes CUDA state) rebuilds the
operators from their specs once and opens the answer cache at the driver's path (SQLite in WAL mode is safe for
several processes on one machine). The driver keeps about 2 x np batches in flight, hands results to `done`
strictly in input order and adds each batch's counters to its own operators. API engines gain nothing from
processes (one process keeps `concurrency` requests in flight); `choose_executor` picks the local one for them.
"""

from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.util
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Iterable

from vlmtag.executors.base import Done, Executor, WorkItem
from vlmtag.executors.worker import OpWorker, WorkerResult, merge_stats, portable
from vlmtag.ops.base import Pipeline

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


class ProcessExecutor(Executor):
    """`workers` processes, each with its own copy of the operators; about 2 x workers batches in flight, so
    memory stays flat however long the input is."""

    builds_own_ops = True

    def __init__(self, workers: int, depth: int | None = None) -> None:
        self.workers = workers
        self.depth = depth or 2 * workers

    def run(self, pipeline: Pipeline, items: Iterable[WorkItem], done: Done, *, cache_path: str | None = None) -> None:
        # The driver's operators only carry specs, stats and the cache here: free their engines (a model the
        # driver loaded would otherwise sit in memory, or on the GPU the workers need).
        pipeline.close()
        pool = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(pipeline.specs, cache_path),
        )
        pending: collections.deque[tuple[WorkItem, Future]] = collections.deque()

        def finish(item: WorkItem, future: Future) -> None:
            result: WorkerResult = future.result()
            merge_stats(pipeline, result)
            if result.error is not None:
                raise result.error
            done(item, result.rows)

        try:
            for item in items:
                pending.append((item, pool.submit(_run_item, item.rows, item.base_dir)))
                while len(pending) >= self.depth:
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
                    merge_stats(pipeline, future.result())
