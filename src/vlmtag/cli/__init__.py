"""The `vlmtag` command. Each subcommand lives in its own module with `add_parser(subparsers)` and
`run(args, console) -> exit status`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys

from vlmtag import __version__
from vlmtag.cli.console import LazyConsole
from vlmtag.engines import EngineError
from vlmtag.errors import EXIT_CONFIG, EXIT_INTERRUPTED, ConfigError
COMMANDS = ("run", "tag", "report", "eval", "batch")  # modules vlmtag.cli.<name>


def _parser() -> tuple[argparse.ArgumentParser, dict]:
    p = argparse.ArgumentParser(prog="vlmtag", description="Tag image datasets with vision-language models.")
    p.add_argument("--version", action="version", version=f"vlmtag {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    sub = p.add_subparsers(dest="command", required=True)
    modules = {}
    for name in COMMANDS:
        module = importlib.import_module(f"vlmtag.cli.{name}")
        module.add_parser(sub)
        # `-q` also after the subcommand (`vlmtag run -q ...`); SUPPRESS keeps a leading -q when it is absent here.
        sub.choices[name].add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                                       help="print only errors")
        modules[name] = module
    return p, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    # How to resume an interrupted job: this very command line, every flag included.
    args.command_line = shlex.join(["vlmtag", *argv])
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING,
                        format="vlmtag: %(levelname)s: %(message)s")
    console = LazyConsole(quiet=args.quiet, soft_wrap=True)
    try:
        return modules[args.command].run(args, console)
    except (ConfigError, EngineError) as e:
        print(f"vlmtag: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("vlmtag: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def entry() -> None:
    """The console script: `main`, then a fast exit. By then every output is written and closed; what is left
    is the interpreter tearing down NumPy, OpenCV, pydantic and the rest, ~0.2 s of every run (mypy skips it the
    same way). Not when Ray was started: its own exit hook stops the workers."""
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: True)():
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    entry()
