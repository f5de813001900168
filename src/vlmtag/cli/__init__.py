"""The `vlmtag` command. Each subcommand lives in its own module with `add_parser(subparsers)` and
`run(args, console) -> exit status`."""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import shlex
import sys
import threading

from vlmtag import __version__
from vlmtag.cli.console import LazyConsole
from vlmtag.engines import EngineError
from vlmtag.errors import EXIT_CONFIG, EXIT_INTERRUPTED, ConfigError
COMMANDS = ("run", "tag", "report", "eval", "batch")  # modules vlmtag.cli.<name>
START_UP_S = 2.0  # how long `entry` keeps the cyclic garbage collector off


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


def pause_collector(seconds: float = START_UP_S) -> threading.Timer:
    """The cyclic garbage collector off for `seconds` (the console script calls this first), then
    `resume_collector`.

    Start-up makes ~110,000 objects that live as long as the process (modules, classes, pydantic's validators,
    aiohttp, NumPy): the collector traverses them over and over while they are being made, ~170 passes holding
    the GIL for ~85 ms of a job's first 0.8 s here, the time its first requests wait. Start-up's garbage cycles
    (~2,000 objects) are all it leaves behind. A process forked meanwhile gets its collector back at once (the
    timer's thread is not forked with it)."""
    gc.disable()
    if hasattr(os, "register_at_fork"):  # POSIX only
        os.register_at_fork(after_in_child=resume_collector)
    timer = threading.Timer(seconds, resume_collector)
    timer.daemon = True
    timer.start()
    return timer


def resume_collector() -> None:
    """Freeze what start-up made (the collector never traverses it again, as after a fork) and turn the collector
    back on. Does nothing when it is on already."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def entry() -> None:
    """The console script: `main`, then a fast exit. By then every output is written and closed; what is left
    is the interpreter tearing down NumPy, OpenCV, pydantic and the rest, ~0.2 s of every run (mypy skips it the
    same way). Not when Ray was started: its own exit hook stops the workers."""
    pause_collector()
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
