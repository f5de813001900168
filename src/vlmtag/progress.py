"""Progress for long runs: a live line on a terminal; a plain line every 30 s in logs; nothing with -q."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from vlmtag.urls import is_remote
from vlmtag.stats import RunStats

if TYPE_CHECKING:
    from rich.console import Console

LOG_EVERY_S = 30.0


def count_rows(shards: Sequence, limit: int | None = None) -> int | None:
    """Rows in the dataset when that is cheap to know (JSONL line count, Parquet metadata), else None."""
    total = 0
    for shard in shards:
        if shard.rows is not None or is_remote(shard.path):
            return None
        if shard.kind == "jsonl":
            with open(shard.path, "rb") as f:
                total += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
                if os.path.getsize(shard.path) and not _ends_with_newline(f):
                    total += 1
        elif shard.kind == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(shard.path).metadata.num_rows
        else:
            return None
    return min(total, limit) if limit is not None else total


def _ends_with_newline(f) -> bool:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def _describe(s: RunStats, rate: float) -> str:
    unreadable = f"  unreadable rows {s.unreadable_rows:,}" if s.unreadable_rows else ""
    return f"images {s.images_processed:,}  {rate:.1f} img/s  failed {s.failed:,}{unreadable}  cached {s.cached:,}"


@contextlib.contextmanager
def progress_reporter(console: Console, total_rows: int | None = None) -> Iterator[Callable[[RunStats], None] | None]:
    """Yields a callback taking the run's stats so far after each batch (None with -q)."""
    if console.quiet:
        yield None
        return
    start = time.perf_counter()
    if not console.is_terminal:
        last = [start]
        preload = getattr(console, "preload", None)

        def log(s: RunStats) -> None:
            nonlocal preload
            if preload is not None:  # the run is under way: the summary's console gets built meanwhile
                preload()
                preload = None
            now = time.perf_counter()
            if now - last[0] >= LOG_EVERY_S:
                last[0] = now
                of = f"/{total_rows:,}" if total_rows else ""
                rate = s.images_processed / max(now - start, 1e-9)
                print(f"vlmtag: progress: rows {s.rows_processed + s.rows_resumed:,}{of}  {_describe(s, rate)}",
                      file=sys.stderr, flush=True)

        yield log
        return
    # imported here: a run writing to a log, not a terminal, never draws a bar (~10 ms of start-up)
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(SpinnerColumn(), TextColumn("rows {task.completed:,.0f}" + (f"/{total_rows:,}" if total_rows else "")),
                  BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), TextColumn("ETA"),
                  TimeRemainingColumn(), console=getattr(console, "rich", console), transient=True) as bar:
        task = bar.add_task("starting…", total=total_rows)

        def update(s: RunStats) -> None:
            rate = s.images_processed / max(time.perf_counter() - start, 1e-9)
            bar.update(task, completed=s.rows_processed + s.rows_resumed, description=_describe(s, rate))

        yield update
