"""Finishing a job: merge its checkpointed batches into the export (each output written whole, then renamed),
count what was written, and write the stats file."""

from __future__ import annotations

import time
from typing import Iterable

from vlmtag import __version__
from vlmtag.io import open_writer
from vlmtag.jobs import Job
from vlmtag.ops.base import Pipeline
from vlmtag.io.base import describe_unreadable
from vlmtag.rowkeys import INVALID_ROW_KEY, META_KEY, error_field
from vlmtag.run.plan import Plan
from vlmtag.stats import RunStats, reason_kind


class OutputCounts:
    """Counts taken from the rows as written, so a resumed job reports the whole export, not one process."""

    def __init__(self, tag_fields: Iterable[str]) -> None:
        self.fields = [(field, error_field(field)) for field in tag_fields]
        self.rows = self.images = self.tagged = self.failed = self.unreadable = 0
        self.first_unreadable: str | None = None
        self.reasons: dict[str, int] = {}

    def add(self, rows: Iterable[dict], shard_name: str = "") -> None:
        for row in rows:
            self.rows += 1
            if INVALID_ROW_KEY in row:
                self.unreadable += 1
                if self.first_unreadable is None:
                    self.first_unreadable = describe_unreadable(row[INVALID_ROW_KEY], shard_name)
            meta = row.get(META_KEY)
            if not isinstance(meta, dict):
                continue
            for tag_field, errors_field in self.fields:
                tags = meta.get(tag_field) or []
                errors = meta.get(errors_field) or [None] * len(tags)
                for t, e in zip(tags, errors):
                    if e:
                        self.failed += 1
                        self.images += 1
                        kind = reason_kind(str(e))
                        self.reasons[kind] = self.reasons.get(kind, 0) + 1
                    elif t:
                        self.tagged += 1
                        self.images += 1

    def fill(self, stats: RunStats) -> None:
        stats.rows, stats.images, stats.tagged, stats.failed = self.rows, self.images, self.tagged, self.failed
        stats.failure_reasons = dict(sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        stats.unreadable_rows, stats.first_unreadable = self.unreadable, self.first_unreadable
        stats.rows_written = self.rows


def write_export(the_plan: Plan, job: Job, tag_fields: Iterable[str]) -> OutputCounts:
    """Every output of the plan, from the job's chunks, in input order."""
    counts = OutputCounts(tag_fields)
    for out, indices in the_plan.targets:
        with open_writer(out) as writer:
            for s in indices:
                for rows in job.read_shard(s):
                    counts.add(rows, the_plan.shards[s].name)
                    writer.write(rows)
    return counts


def finalize(the_plan: Plan, job: Job, pipeline: Pipeline, stats: RunStats, *, dataset_label: str,
             started: float) -> RunStats:
    """Write the export and its stats file, then mark the job complete. `stats` holds this run's counts."""
    write_export(the_plan, job, pipeline.tag_fields).fill(stats)
    stats.wall_seconds = time.perf_counter() - started
    stats.export_path = the_plan.export_path
    stats.dataset_path = dataset_label
    stats.images_root = the_plan.images_root()
    stats.parts = the_plan.parts()
    stats.completed = True
    stats.provenance = {"vlmtag_version": __version__, "ops": pipeline.provenance()}
    stats.write(the_plan.stats_path)
    job.mark_complete({"export": the_plan.export_path, "rows": stats.rows, "finished": time.time()})
    return stats
