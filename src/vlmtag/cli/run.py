"""`vlmtag run --config recipe.yaml`: run a Data-Juicer style recipe."""

from __future__ import annotations

import argparse

from rich.console import Console

from vlmtag.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run a Data-Juicer style recipe (YAML)")
    p.add_argument("--config", "-c", required=True, help="recipe file (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (dotted; 'op.KEY' = the tagger's argument); repeatable")
    p.add_argument("--limit", type=int, metavar="N", help="tag only the first N rows")


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ConfigError(f"--limit={limit}: expected a number ≥ 0")


def run(args: argparse.Namespace, console: Console) -> int:
    from vlmtag.cli import EXIT_ABORTED, EXIT_OK
    from vlmtag.config import load_recipe_dict, parse_recipe
    from vlmtag.run import run_recipe
    from vlmtag.summary import render_summary

    check_limit(args.limit)
    recipe = parse_recipe(load_recipe_dict(args.config, args.overrides))
    result = run_recipe(recipe, limit=args.limit)
    render_summary(result, console)
    return EXIT_ABORTED if result.aborted else EXIT_OK
