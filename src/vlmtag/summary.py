"""The one-screen summary printed at the end of a run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from vlmtag.run import RunResult


def render_summary(result: RunResult, console: Console) -> None:
    s = result.stats
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("rows", f"{s.get('rows', 0):,}"),
        ("rows already tagged (skipped)", f"{s.get('rows_skipped', 0):,}"),
        ("images", f"{s.get('images', 0):,}"),
        ("tagged", f"{s.get('tagged', 0):,}"),
        ("failed", f"{s.get('failed', 0):,}"),
        ("requests", f"{s.get('requests', 0):,}"),
        ("retries", f"{s.get('retries', 0):,}"),
        ("tokens in / out", f"{s.get('prompt_tokens', 0):,} / {s.get('completion_tokens', 0):,}"),
        ("wall time", f"{result.wall_seconds:.1f} s"),
        ("images/s", f"{result.images_per_second:.2f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    reasons = s.get("failure_reasons") or {}
    if reasons:
        console.print("top failure reasons:")
        for reason, n in list(reasons.items())[:5]:
            console.print(f"  {n:>8,}  {reason}", markup=False, highlight=False)
    if result.aborted:
        console.print(f"[bold red]run aborted:[/] {result.aborted}", highlight=False)
        console.print(f"finished rows: {result.partial_path} ({result.rows_written:,} rows)", markup=False)
    else:
        console.print(f"output:  {result.export_path} ({result.rows_written:,} rows)", markup=False)
    console.print(f"summary: {result.stats_path}", markup=False)
