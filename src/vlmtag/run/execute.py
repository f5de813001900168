"""Executing a planned job: the batches not yet done go through the executor, and each finished batch is
checkpointed the moment it comes back (in input order), so a run killed at any moment resumes where it stopped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from vlmtag.executors import Executor, WorkItem
from vlmtag.io.dataset import ShardReadError
from vlmtag.jobs import Job
from vlmtag.ops import RunAborted
from vlmtag.ops.base import Pipeline
from vlmtag.run.plan import Plan, iter_batches
from vlmtag.stats import RunStats

#: Takes the run's stats so far (this run's counters) after each finished batch.
ProgressCallback = Callable[[RunStats], None]
#: Changes a batch's rows before the operators see them (`--retry-failed` clears failed rows' tags).
RowFilter = Callable[[list[dict]], list[dict]]


@dataclass
class Execution:
    """How the execution of a job went; the counters stay on the pipeline's operators."""

    rows_done: int = 0  # rows checkpointed by this run
    rows_resumed: int = 0  # rows an earlier run of the same job had checkpointed
    aborted: str | None = None  # why the run stopped early (fail-fast, a broken shard, Ctrl-C)
    interrupted: bool = False  # Ctrl-C

    def stats(self, pipeline: Pipeline) -> RunStats:
        """This run's stats so far (the export counts cover the rows this run did)."""
        stats = RunStats(rows_processed=self.rows_done, rows_resumed=self.rows_resumed, cost=pipeline.cost())
        stats.take_counters(pipeline.counters())
        stats.rows, stats.images = self.rows_done, stats.images_processed
        return stats


def execute(
    pipeline: Pipeline,
    the_plan: Plan,
    job: Job,
    executor: Executor,
    *,
    limit: int | None = None,
    prepare_rows: RowFilter | None = None,
    progress: ProgressCallback | None = None,
    cache_path: str | None = None,
) -> Execution:
    """Run every batch the job has not done yet. A stop (fail-fast, a shard that cannot be read, Ctrl-C) is
    recorded in the result, not raised: the finished batches stay checkpointed for the resume."""
    run = Execution()
    shards = the_plan.shards

    def items() -> Iterator[WorkItem]:
        for s, b, rows in iter_batches(shards, pipeline.batch_size, limit):
            if job.is_done(s, b):
                run.rows_resumed += len(rows)
                continue
            yield WorkItem((s, b), prepare_rows(rows) if prepare_rows else rows, shards[s].base_dir)

    def done(item: WorkItem, rows: list[dict]) -> None:
        job.write_chunk(*item.key, rows)
        run.rows_done += len(rows)
        if progress is not None:
            progress(run.stats(pipeline))

    try:
        executor.run(pipeline, items(), done, cache_path=cache_path)
    except (RunAborted, ShardReadError) as e:
        run.aborted = str(e)
    except KeyboardInterrupt:
        run.aborted, run.interrupted = "interrupted", True
    return run
