"""The one-screen summary printed at the end of a run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmtag.errors import EXIT_ABORTED, EXIT_INTERRUPTED, EXIT_OK
from vlmtag.run import RunResult

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


def exit_status(result: RunResult) -> int:
    if result.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_ABORTED if result.aborted else EXIT_OK


def render_summary(result: RunResult, console: Console, *, resume_command: str = "") -> None:
    s = result.stats
    if result.already_complete:
        console.print(f"already complete: {result.export_path} ({result.rows_written:,} rows); nothing to do",
                      markup=False, highlight=False)
        console.print(f"summary: {result.stats_path}", markup=False)
        return
    rows = [
        ("rows", f"{s.rows:,}"),
        ("images", f"{s.images:,}"),
        ("tagged", f"{s.tagged:,}"),
        ("failed", f"{s.failed:,}"),
        *([("unreadable rows (kept, not tagged)", f"{s.unreadable_rows:,}")] if s.unreadable_rows else []),
        *([("texts cut to max_text_chars", f"{s.prompts_cut:,}")] if s.prompts_cut else []),
        ("from cache", f"{s.cached:,}"),
        ("requests", f"{s.requests:,}"),
        ("retries", f"{s.retries:,}"),
        ("tokens in / out", f"{s.prompt_tokens:,} / {s.completion_tokens:,}"),
        *([("cost (from server token counts)", f"{s.cost:.4f}")] if s.cost is not None else []),
        ("wall time", f"{s.wall_seconds:.1f} s"),
        ("images/s", f"{s.images_per_second:.2f}"),
    ]
    if s.rows_resumed:
        rows.insert(1, ("rows resumed (done before)", f"{s.rows_resumed:,}"))
    if s.rows_already_tagged:
        rows.insert(1, ("rows already tagged (kept)", f"{s.rows_already_tagged:,}"))
    console.print(_table(rows))
    if s.unreadable_rows:
        first = f" (first at {s.first_unreadable})" if s.first_unreadable else ""
        console.print(f"unreadable rows: {s.unreadable_rows:,}{first}", markup=False, highlight=False)
    reasons = s.failure_reasons
    if reasons:
        console.print("top failure reasons:")
        for reason, n in list(reasons.items())[:5]:
            console.print(f"  {n:>8,}  {reason}", markup=False, highlight=False)
    if result.aborted:
        what = "interrupted" if result.interrupted else f"run aborted: {result.aborted}"
        console.print(f"[bold red]{what}[/]", highlight=False)
        console.print(f"finished batches are kept in {result.work_dir}; to resume, run the same command again:",
                      markup=False, highlight=False)
        if resume_command:
            console.print(f"  {resume_command}", markup=False, highlight=False)
        return
    console.print(f"output:  {result.export_path} ({result.rows_written:,} rows)", markup=False)
    console.print(f"summary: {result.stats_path}", markup=False)


def render_dry_run(report, console: Console) -> None:
    rows = [
        ("rows", f"{report.rows:,}"),
        ("rows already tagged (kept)", f"{report.rows_already_tagged:,}"),
        ("images", f"{report.images:,}"),
        ("images that open", f"{report.images_ok:,}"),
        ("bad images", f"{sum(report.bad_images.values()):,}"),
        ("URLs (not fetched)", f"{report.urls_not_checked:,}"),
        ("input tokens (estimate)", f"{report.input_tokens:,}"),
        ("output tokens (estimate / at most)", f"{report.output_tokens:,} / {report.output_tokens_max:,}"),
    ]
    if report.cost is not None:
        rows.append(("cost (estimate / at most)", f"{report.cost:.4f} / {report.cost_max:.4f}"))
        if report.batch_cost is not None:
            times = f"online × {report.batch_discount:g}" if report.batch_discount is not None else "Batch API"
            rows.append((f"batch price ({times}; estimate / at most)",
                         f"{report.batch_cost:.4f} / {report.batch_cost_max:.4f}"))
    console.print(_table(rows, title="dry run: no request sent"))
    for kind, n in report.bad_images.most_common(5):
        console.print(f"  {n:>8,}  {report.examples[kind]}", markup=False, highlight=False)


def _table(rows: list[tuple[str, str]], title: str | None = None) -> Table:
    """Names in bold on the left, values right-aligned: the layout of every summary."""
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False, title=title, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in rows:
        table.add_row(name, value)
    return table
