"""A tagging run: plan (`plan.py`), execute batch by batch with checkpoints (`execute.py`), finalize: merge the
export and write its stats (`finalize.py`). `run_job` only puts these steps in order.

Resume is always on: a run is a job identified by its dataset, export and operator settings; finished batches
are kept in `<work_dir>/.vlmtag/jobs/<id>/`, so rerunning the same command after a crash does only what is left.

This layer sits on top: it may use io, ops (through `ops.base`), executors, cache and jobs; none of them may
import it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from vlmtag.cache import SqliteAnswerCache
from vlmtag.config import Recipe, build_ops
from vlmtag.errors import ConfigError
from vlmtag.executors import Executor, LocalExecutor, choose_executor
from vlmtag.io import Shard
from vlmtag.jobs import Job
from vlmtag.ops.base import Operator, Pipeline
from vlmtag.run.execute import ProgressCallback, RowFilter, execute
from vlmtag.run.finalize import finalize
from vlmtag.run.plan import Plan, count_unreadable, iter_batches, job_identity, plan, recipe_shards
from vlmtag.run.retry import retry_shards, without_failures
from vlmtag.stats import RunStats

__all__ = ["RunResult", "iter_batches", "plan", "run_job", "run_recipe"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    export_path: str
    stats_path: str
    stats: RunStats
    aborted: str | None = None
    interrupted: bool = False
    already_complete: bool = False
    work_dir: str = ""  # the job's folder (checkpoints)
    outputs: list[str] = field(default_factory=list)

    @property
    def rows_written(self) -> int:
        return self.stats.rows_written

    @property
    def wall_seconds(self) -> float:
        return self.stats.wall_seconds

    @property
    def images_per_second(self) -> float:
        return self.stats.images_per_second


def run_job(
    ops: Sequence[Operator] | Pipeline,
    shards: list[Shard],
    export_path: str,
    *,
    work_dir: str | None = None,
    use_cache: bool = True,
    cache_path: str | None = None,
    limit: int | None = None,
    export_type: str | None = None,
    dataset_label: str = "",
    prepare_rows: RowFilter | None = None,
    mode: str = "tag",
    progress: ProgressCallback | None = None,
    executor: Executor | None = None,
    strict: bool = False,
    adjust_stats: Callable[[RunStats], None] | None = None,
) -> RunResult:
    """Tag `shards` into `export_path`, resuming a job with the same identity if one was interrupted. `strict`:
    a row that cannot be read is an error before any request, instead of a row kept in place. `adjust_stats` sees
    this run's stats before they are written (batch mode adds what the job's batches did)."""
    pipeline = ops if isinstance(ops, Pipeline) else Pipeline(ops)
    executor = executor or LocalExecutor()
    the_plan = plan(shards, export_path, export_type=export_type, work_dir=work_dir)
    if strict:
        count, first = count_unreadable(shards, pipeline.batch_size, limit)
        if count:
            raise ConfigError(f"--strict: unreadable rows: {count:,} (first at {first})")
    job = Job(the_plan.state_root, job_identity(the_plan, pipeline, mode=mode, limit=limit))
    previous = _finished_run(the_plan, job)
    if previous is not None:
        return _result(the_plan, job, previous, already_complete=True)

    _set_up(pipeline, executor)
    cache = None
    if use_cache:
        cache_path = cache_path or os.path.join(the_plan.state_root, "cache.sqlite")
        cache = SqliteAnswerCache(cache_path)
    pipeline.attach_cache(cache)
    started = time.perf_counter()
    closing: threading.Thread | None = None
    try:
        try:
            run = execute(pipeline, the_plan, job, executor, limit=limit, prepare_rows=prepare_rows,
                          progress=progress, cache_path=cache_path if cache is not None else None)
        finally:
            pipeline.close()
            if cache is not None:
                # Its last close copies the write-ahead log into the database and syncs it (~10 ms, without the
                # GIL): on a thread, while the export is written.
                closing = threading.Thread(target=cache.close, name="vlmtag-cache-close")
                closing.start()
        stats = run.stats(pipeline)
        if adjust_stats is not None:
            adjust_stats(stats)
        if run.aborted:  # finished batches stay checkpointed for the resume; no export, no stats file
            stats.wall_seconds = time.perf_counter() - started
            return _result(the_plan, job, stats, aborted=run.aborted, interrupted=run.interrupted)
        stats = finalize(the_plan, job, pipeline, stats, dataset_label=dataset_label, started=started)
        return _result(the_plan, job, stats)
    finally:
        if closing is not None:
            closing.join()


def _finished_run(the_plan: Plan, job: Job) -> RunStats | None:
    """The stats of this job's last run when it finished without failures (nothing to do), else None. A job that
    finished with failures runs again: the answers that came back are in the cache, so only what failed is asked
    again."""
    if not job.completed() or not os.path.exists(the_plan.stats_path):
        return None
    if not all(os.path.exists(o) for o in the_plan.outputs):
        return None
    stats = RunStats.read(the_plan.stats_path)
    if not stats.failed:
        stats.wall_seconds = 0.0
        return stats
    log.warning("the last run of this job had %d failed images; running it again to retry them", stats.failed)
    job.restart()
    return None


def _set_up(pipeline: Pipeline, executor: Executor) -> None:
    """Build the engines now, so bad settings fail before any data is read; but never load a local model into
    the driver when the executor's workers load their own (that memory, or GPU, would be wasted). Engines start
    only where batches run: here, unless the executor's workers build their own operators."""
    for op in pipeline:
        if not (executor.builds_own_ops and op.resources.local_model):
            op.setup()
    if not executor.builds_own_ops:
        pipeline.start()


def _result(the_plan: Plan, job: Job, stats: RunStats, **status: object) -> RunResult:
    return RunResult(the_plan.export_path, the_plan.stats_path, stats, work_dir=job.dir, outputs=the_plan.outputs,
                     **status)


def run_recipe(
    recipe: Recipe,
    *,
    limit: int | None = None,
    retry_failed: bool = False,
    progress: ProgressCallback | None = None,
    strict: bool = False,
) -> RunResult:
    pipeline = Pipeline(build_ops(recipe))
    if retry_failed:
        shards = retry_shards(recipe.export_path)
    else:
        shards = recipe_shards(recipe.dataset_path)
    extra = recipe.model_extra or {}
    return run_job(
        pipeline,
        shards,
        recipe.export_path,
        work_dir=recipe.work_dir,
        use_cache=recipe.use_cache,
        cache_path=extra.get("cache_path"),
        limit=limit,
        export_type=extra.get("export_type"),
        dataset_label=recipe.dataset_path,
        prepare_rows=without_failures(pipeline.tag_fields) if retry_failed else None,
        mode="retry-failed" if retry_failed else "tag",
        progress=progress,
        executor=choose_executor(pipeline, executor_type=recipe.executor_type, np=recipe.np,
                                 ray_address=recipe.ray_address),
        strict=strict,
    )
