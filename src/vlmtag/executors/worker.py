"""The worker side of the executors that run outside the driver process (`np` > 1 processes, Ray actors).

A worker rebuilds the driver's pipeline from its operators' specs, once, attaches its own answer cache at the
driver's cache path, and then runs work items: rows in, rows out, plus what the operators counted while doing
it (the driver adds those counts to its own operators, so summaries and progress stay right).
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from vlmtag.ops.base import OpSpec, Pipeline

log = logging.getLogger(__name__)


@dataclass
class WorkerResult:
    rows: list[dict] | None = None
    stats: list[dict] = field(default_factory=list)  # one `TaggingStats.as_dict()` delta per operator
    error: BaseException | None = None  # raised again by the driver, same type and message


def merge_stats(pipeline: Pipeline, result: WorkerResult) -> None:
    for op, delta in zip(pipeline, result.stats):
        op.stats.merge(delta)


def portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (so the driver raises the same type and message), else a RuntimeError."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class OpWorker:
    """Operators rebuilt from specs, with their engines built and the cache attached."""

    def __init__(self, specs: Sequence[OpSpec], cache_path: str | None) -> None:
        from vlmtag.cache import SqliteAnswerCache
        from vlmtag.ops import get_operator

        self.pipeline = Pipeline([get_operator(name)(**kwargs) for name, kwargs in specs])
        self.cache = None
        if cache_path:
            try:
                self.cache = SqliteAnswerCache(cache_path)
            except Exception as e:  # e.g. a path that exists only on the driver's machine
                log.warning("answer cache %s cannot be opened here (%s); this worker runs without it", cache_path, e)
            self.pipeline.attach_cache(self.cache)
        try:
            self.pipeline.setup()
            self.pipeline.start()
        except BaseException:
            self.close()
            raise
        self._stats_lock = threading.Lock()
        self._reported = [op.stats.as_dict() for op in self.pipeline]

    def run(self, rows: list[dict], base_dir: str | None) -> WorkerResult:
        """One work item. Safe to call from several threads at once (a Ray actor may run two items)."""
        try:
            rows = self.pipeline.process_rows(rows, base_dir=base_dir)
        except Exception as e:
            return WorkerResult(None, self._stats_delta(), portable(e))
        return WorkerResult(rows, self._stats_delta())

    def _stats_delta(self) -> list[dict]:
        """What the operators counted since the last call. With items running side by side a count may go
        back with the other item's result, but every count goes back exactly once, so the driver's sums hold."""
        with self._stats_lock:
            deltas = []
            for i, op in enumerate(self.pipeline):
                now = op.stats.as_dict()
                before = self._reported[i]
                delta = {k: v - before.get(k, 0) for k, v in now.items() if isinstance(v, int)}
                delta["failure_reasons"] = dict(Counter(now["failure_reasons"]) - Counter(before["failure_reasons"]))
                self._reported[i] = now
                deltas.append(delta)
            return deltas

    def close(self) -> None:
        for op in self.pipeline:
            try:
                op.close()
            except Exception as e:
                log.warning("closing an operator failed: %s", e)
        if self.cache is not None:
            self.cache.close()
            self.cache = None
