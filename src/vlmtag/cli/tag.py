"""`vlmtag tag PATH... -o out.jsonl`: tag image files, folders or URLs without writing a recipe."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from vlmtag.cli.batch import batch_flags, check_batch_flags
from vlmtag.cli.run import add_job_flags, check_limit
from vlmtag.defaults import DEFAULT_MODEL as DEFAULT_API_MODEL
from vlmtag.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_QUICK_MODEL = "builtin:default"


def add_parser(sub) -> None:
    p = sub.add_parser("tag", help="tag image files or folders into a JSONL/JSON/Parquet file")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or URLs")
    p.add_argument("-o", "--output", required=True, help="output file (.jsonl, .json or .parquet)")
    p.add_argument("--model", help=f"model name (default {DEFAULT_QUICK_MODEL}; {DEFAULT_API_MODEL} with --api-base)")
    p.add_argument("--api-base", metavar="URL", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    p.add_argument("--concurrency", type=int, default=32, help="API requests in flight (default 32)")
    p.add_argument("--json-schema", action="store_true", help="ask the server for structured output")
    p.add_argument("--limit", type=int, metavar="N", help="tag only the first N images")
    add_job_flags(p)
    batch_flags(p)


def run(args: argparse.Namespace, console: Console) -> int:
    from vlmtag.ops import ImageTaggingVLMMapper
    from vlmtag.progress import progress_reporter
    from vlmtag.io.inline import inline_shard
    from vlmtag.run import run_job
    from vlmtag.summary import exit_status, render_summary

    check_limit(args.limit)
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency={args.concurrency}: expected a number ≥ 1")
    is_api = args.api_base is not None
    model = args.model or (DEFAULT_API_MODEL if is_api else DEFAULT_QUICK_MODEL)
    op = ImageTaggingVLMMapper(
        model,
        is_api_model=is_api,
        model_params={"base_url": args.api_base} if is_api else {},
        concurrency=args.concurrency,
        json_schema=args.json_schema,
        overwrite=args.overwrite,
        batch_api=args.batch_api,
    )
    shard = inline_shard(args.paths, os.getcwd())
    check_batch_flags(args, args.batch_api)
    if args.batch_api:
        from vlmtag.batch import open_batch_job
        from vlmtag.cli.batch import run_batch_job_cli

        if not is_api:
            raise ConfigError("--batch-api needs --api-base (the provider whose Batch API takes the requests)")
        bj = open_batch_job([op], [shard], args.output, limit=args.limit, dataset_label=",".join(args.paths))
        return run_batch_job_cli(bj, console, use_cache=not args.no_cache, fallback=args.batch_fallback == "online",
                                 strict=args.strict, total_rows=None, resume_command=args.command_line)
    with progress_reporter(console) as progress:
        result = run_job([op], [shard], args.output, use_cache=not args.no_cache, limit=args.limit,
                         dataset_label=",".join(args.paths), progress=progress, strict=args.strict)
    render_summary(result, console, resume_command=args.command_line)
    return exit_status(result)
