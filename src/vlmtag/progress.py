"""A live progress line for long runs on a terminal; nothing when output is not a terminal."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


@contextlib.contextmanager
def progress_reporter(console: Console) -> Iterator[Callable[[dict], None] | None]:
    """Yields a callback taking the run's counters after each batch (or None when not on a terminal)."""
    if not console.is_terminal or console.quiet:
        yield None
        return
    start = time.perf_counter()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("starting…", total=None)

        def update(c: dict) -> None:
            rate = c.get("images", 0) / max(time.perf_counter() - start, 1e-9)
            bar.update(task, description=(
                f"rows {c['rows']:,} (+{c.get('resumed_rows', 0):,} resumed)  images {c.get('images', 0):,}  "
                f"{rate:.1f} img/s  failed {c.get('failed', 0):,}  cached {c.get('cached', 0):,}"))

        yield update
