"""`vlmtag batch status|cancel|export|ingest --config R`: a batch job's batches, and batch mode without a provider.
Also what `run --batch-api` and `tag --batch-api` print while their batches run."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import TYPE_CHECKING, Callable

from vlmtag.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console

LOG_EVERY_S = 30.0


def add_parser(sub) -> None:
    p = sub.add_parser("batch", help="a batch job's batches (status, cancel) and batch files (export, ingest)",
                       description="Look at or cancel the Batch API batches of the job a recipe runs, or do batch "
                                   "mode without a provider: export request files, ingest result files.")
    actions = p.add_subparsers(dest="action", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", "-c", required=True, help="the recipe of the job (YAML)")
        q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="the same --set as the run (they decide which job it is)")
        q.add_argument("--limit", type=int, metavar="N", help="the same --limit as the run")

    common(actions.add_parser("status", help="each batch: id, state, counts, age; then what is left"))
    common(actions.add_parser("cancel", help="cancel the job's running batches (what they completed is kept)"))
    q = actions.add_parser("export", help="write request files and an index, without submitting them")
    common(q)
    q.add_argument("dir", metavar="DIR", help="folder for requests-NNNNN.jsonl, index.jsonl and manifest.json")
    q = actions.add_parser("ingest", help="read result files produced elsewhere (vllm run-batch) and write the export")
    common(q)
    q.add_argument("results", nargs="+", metavar="RESULTS.jsonl", help="result (and error) files")


def run(args: argparse.Namespace, console: Console) -> int:
    from vlmtag.batch import open_recipe_job
    from vlmtag.cli.run import check_limit
    from vlmtag.config import load_recipe_dict, parse_recipe

    check_limit(args.limit)
    recipe = parse_recipe(load_recipe_dict(args.config, list(args.overrides)))
    bj = open_recipe_job(recipe, limit=args.limit)
    return {"status": _status, "cancel": _cancel, "export": _export, "ingest": _ingest}[args.action](bj, args,
                                                                                                       console)


def _status(bj, args, console: Console) -> int:
    from vlmtag.batch import status

    lines, left = status(bj)
    say = _printer(console)
    say(f"job {bj.job.id} ({bj.job.dir})")
    if not lines:
        say("no batch submitted")
    for b in lines:
        error = f"  (last known; cannot ask now: {b.error})" if b.error else ""
        say(f"{b.batch_id}  {b.status:<11} {b.completed:,}/{b.total:,} completed, {b.failed:,} failed  "
            f"age {_age(b.age_s)}  round {b.round}{error}")
    for line in left:
        say(line)
    return 0


def _cancel(bj, args, console: Console) -> int:
    from vlmtag.batch import cancel

    say = _printer(console)
    done = cancel(bj)
    if not done:
        say("no running batch to cancel")
    for batch_id, what in done:
        say(f"{batch_id}: {what}")
    if done:
        say("what they completed is kept; a run polling them stops once they end. Run `vlmtag run` again to "
            "submit what is left.")
    return 0


def _export(bj, args, console: Console) -> int:
    from vlmtag.batch import export_requests

    manifest = export_requests(bj, args.dir)
    say = _printer(console)
    say(f"{manifest['requests']:,} requests in {len(manifest['files'])} files under {args.dir} (index.jsonl maps "
        "each custom_id to its file and rows); nothing was submitted")
    for f in manifest["files"]:
        say(f"  {f['file']}: {f['requests']:,} requests, {f['bytes'] / 1e6:.1f} MB")
    if manifest["files"]:
        say(f"e.g. vllm run-batch -i {args.dir.rstrip('/')}/{manifest['files'][0]['file']} -o results-00000.jsonl "
            f"--model {manifest['model']}; then: vlmtag batch ingest --config {args.config} results-*.jsonl")
    return 0


def _ingest(bj, args, console: Console) -> int:
    from vlmtag.batch import finish_ingested, ingest
    from vlmtag.summary import exit_status, render_summary

    got = ingest(bj, args.results)
    say = _printer(console)
    say(f"ingested {got.lines:,} result lines: {got.answered:,} answered, {got.failed:,} failed")
    with lazy_progress(console) as progress:
        result = finish_ingested(bj, got, progress=progress)
    render_summary(result, console, resume_command=args.command_line)
    return exit_status(result)


# -- what a batch run shows ------------------------------------------------------------------------------------


def _printer(console: Console) -> Callable[[str], None]:
    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False)
    return say


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


@contextlib.contextmanager
def lazy_progress(console: Console, total_rows: int | None = None, before: Callable[[], None] | None = None):
    """The export's progress reporter, started at its first report (so the batch phase before it has the screen)."""
    from vlmtag.progress import progress_reporter

    with contextlib.ExitStack() as stack:
        reporter: list = []

        def progress(stats) -> None:
            if not reporter:
                if before is not None:
                    before()
                reporter.append(stack.enter_context(progress_reporter(console, total_rows)))
            if reporter[0] is not None:
                reporter[0](stats)

        yield progress


class BatchScreen:
    """Lines for what happens (uploads, batches created and ended, waits), and a live line with the batches'
    counts while polling (on a terminal; every 30 s in logs); nothing with -q."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._status = None
        self._last_log = 0.0
        self._last_text = ""

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def batches(self, p) -> None:
        if self.console.quiet:
            return
        text = p.describe()
        if self.console.is_terminal:
            if self._status is None:
                self._status = self.console.status(text)
                self._status.start()
            else:
                self._status.update(text)
            return
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S or text.split(";")[0] != self._last_text.split(";")[0]:
            self._last_log, self._last_text = now, text
            print(f"vlmtag: progress: {text}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def run_batch_job_cli(bj, console: Console, *, fallback: bool, strict: bool, total_rows: int | None,
                      resume_command: str, use_cache: bool = True) -> int:
    """`run --batch-api` and `tag --batch-api`: the batch phase, the export, the summary."""
    from vlmtag.batch import run_batch
    from vlmtag.summary import exit_status, render_summary

    screen = BatchScreen(console)
    try:
        with lazy_progress(console, total_rows, before=screen.stop) as progress:
            result = run_batch(bj, use_cache=use_cache, fallback=fallback, strict=strict, progress=progress,
                               batch_progress=screen.batches, note=screen.note)
    finally:
        screen.stop()
    u = bj.state.usage
    if u.batches and not result.already_complete:
        price = f" at the batch price (online prices × {bj.options.batch_price_discount:g})"
        console.print(f"batches: {u.batches:,} ended; {u.requests:,} requests answered by them{price}",
                      markup=False, highlight=False)
    render_summary(result, console, resume_command=resume_command)
    return exit_status(result)


def batch_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-api", action="store_true",
                   help="send the requests through the provider's Batch API (half price, answers within 24 h)")
    p.add_argument("--batch-fallback", choices=["online"],
                   help="with --batch-api: send what would go into a follow-up batch online instead")


def check_batch_flags(args: argparse.Namespace, batch_mode: bool) -> None:
    if args.batch_fallback and not batch_mode:
        raise ConfigError("--batch-fallback needs --batch-api (or batch_api: true in the recipe)")
    if batch_mode and getattr(args, "retry_failed", False):
        raise ConfigError("--retry-failed does not go with batch mode: run the same command again instead (the "
                          "failed images of a finished job go into a new batch)")
