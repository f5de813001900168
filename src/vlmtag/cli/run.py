"""`vlmtag run --config recipe.yaml`: run a Data-Juicer style recipe."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from vlmtag.cli.batch import batch_flags, check_batch_flags
from vlmtag.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run a Data-Juicer style recipe (YAML)")
    p.add_argument("--config", "-c", required=True, help="recipe file (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (dotted; 'op.KEY' = the tagger's argument); repeatable")
    p.add_argument("--limit", type=int, metavar="N", help="tag only the first N rows")
    add_job_flags(p)
    batch_flags(p)
    p.add_argument("--retry-failed", action="store_true",
                   help="re-attempt only the images that have errors in the existing export")
    p.add_argument("--dry-run", action="store_true",
                   help="read the input, check the images open, estimate tokens and cost; send no request")


def add_job_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the answer cache")
    p.add_argument("--overwrite", action="store_true", help="tag rows again even if they already have tags")
    p.add_argument("--strict", action="store_true",
                   help="stop (exit 2) before any request when a row cannot be read, instead of keeping it untagged")


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ConfigError(f"--limit={limit}: expected a number ≥ 0")


def run(args: argparse.Namespace, console: Console) -> int:
    from vlmtag.config import load_recipe_dict, parse_recipe
    from vlmtag.progress import progress_reporter
    from vlmtag.run import run_recipe
    from vlmtag.summary import exit_status, render_summary

    check_limit(args.limit)
    overrides = list(args.overrides)
    if args.no_cache:
        overrides.append("use_cache=false")
    if args.overwrite:
        overrides.append("op.overwrite=true")
    if args.batch_api:
        overrides.append("op.batch_api=true")
    recipe = parse_recipe(load_recipe_dict(args.config, overrides))
    batch_mode = any((op_args or {}).get("batch_api") for item in recipe.process for op_args in item.values())
    check_batch_flags(args, batch_mode and not args.dry_run)
    if args.dry_run:
        from vlmtag.dryrun import dry_run_recipe
        from vlmtag.summary import render_dry_run

        render_dry_run(dry_run_recipe(recipe, limit=args.limit), console)
        return 0
    if batch_mode:
        from vlmtag.batch import open_recipe_job
        from vlmtag.cli.batch import run_batch_job_cli

        return run_batch_job_cli(open_recipe_job(recipe, limit=args.limit), console, use_cache=recipe.use_cache,
                                 fallback=args.batch_fallback == "online", strict=args.strict,
                                 total_rows=_total_rows(recipe, args.limit), resume_command=args.command_line)
    with progress_reporter(console, _total_rows(recipe, args.limit)) as progress:
        result = run_recipe(recipe, limit=args.limit, retry_failed=args.retry_failed, progress=progress,
                            strict=args.strict)
    render_summary(result, console, resume_command=args.command_line)
    return exit_status(result)


def _total_rows(recipe, limit: int | None) -> int | None:
    from vlmtag.io import open_dataset
    from vlmtag.progress import count_rows

    try:
        return count_rows(open_dataset(recipe.dataset_path), limit)
    except (OSError, ValueError):
        return None  # the run itself reports a bad dataset path
