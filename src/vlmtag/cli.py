"""The `vlmtag` command: `run` a recipe, or `tag` image files quickly."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rich.console import Console

from vlmtag import __version__
from vlmtag.engines import EngineError
from vlmtag.errors import ConfigError

DEFAULT_QUICK_MODEL = "builtin:default"
DEFAULT_API_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
EXIT_OK, EXIT_ABORTED, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmtag", description="Tag image datasets with vision-language models.")
    p.add_argument("--version", action="version", version=f"vlmtag {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a Data-Juicer style recipe (YAML)")
    run.add_argument("--config", "-c", required=True, help="recipe file (YAML)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key (dotted; 'op.KEY' = the tagger's argument); repeatable")
    run.add_argument("--limit", type=int, metavar="N", help="tag only the first N rows")

    tag = sub.add_parser("tag", help="tag image files or folders into a JSONL/JSON/Parquet file")
    tag.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or URLs")
    tag.add_argument("-o", "--output", required=True, help="output file (.jsonl, .json or .parquet)")
    tag.add_argument("--model", help=f"model name (default {DEFAULT_QUICK_MODEL}; {DEFAULT_API_MODEL} with --api-base)")
    tag.add_argument("--api-base", metavar="URL", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    tag.add_argument("--concurrency", type=int, default=32, help="API requests in flight (default 32)")
    tag.add_argument("--json-schema", action="store_true", help="ask the server for structured output")
    tag.add_argument("--limit", type=int, metavar="N", help="tag only the first N images")
    return p


def _run(args: argparse.Namespace, console: Console) -> int:
    from vlmtag.config import load_recipe_dict, parse_recipe
    from vlmtag.run import batched, image_rows, run_ops, run_recipe
    from vlmtag.summary import render_summary

    if args.limit is not None and args.limit < 0:
        raise ConfigError(f"--limit={args.limit}: expected a number ≥ 0")
    if args.command == "run":
        recipe = parse_recipe(load_recipe_dict(args.config, args.overrides))
        result = run_recipe(recipe, limit=args.limit)
    else:
        from vlmtag.ops import ImageTaggingVLMMapper

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
        )
        rows = list(image_rows(args.paths))  # walks folders first, so a typo fails before any work
        result = run_ops([op], batched(rows, op.options.batch_size), args.output,
                         base_dir=os.getcwd(), dataset=",".join(args.paths), limit=args.limit)
    render_summary(result, console)
    return EXIT_ABORTED if result.aborted else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING,
                        format="vlmtag: %(levelname)s: %(message)s")
    console = Console(quiet=args.quiet, soft_wrap=True)
    try:
        return _run(args, console)
    except (ConfigError, EngineError) as e:
        print(f"vlmtag: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("vlmtag: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
