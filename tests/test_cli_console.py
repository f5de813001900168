"""The command's console is rich's, built on first use: it must say what rich's own console says."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest
from rich.console import Console

from vlmtag.cli.console import LazyConsole

CHECK = (
    "import json, sys\n"
    "from vlmtag.cli.console import LazyConsole\n"
    "lazy = LazyConsole(soft_wrap=True).is_terminal\n"
    "loaded = 'rich' in sys.modules\n"
    "from rich.console import Console\n"
    "print(json.dumps([lazy, Console(soft_wrap=True).is_terminal, loaded]), file=sys.stderr)\n"
)


def is_terminal_in_child(env_changes: dict, *, tty: bool) -> list:
    """[LazyConsole's is_terminal, rich's, whether rich was loaded to answer], in a child whose stdout is a pipe
    or a pseudo-terminal."""
    env = {k: v for k, v in os.environ.items() if k not in ("TTY_COMPATIBLE", "FORCE_COLOR", "TTY_INTERACTIVE")}
    env.update(env_changes)
    if tty:
        import pty

        leader, follower = pty.openpty()
        try:
            out = subprocess.run([sys.executable, "-c", CHECK], stdout=follower, stderr=subprocess.PIPE, env=env,
                                 text=True, check=True)
        finally:
            os.close(follower)
            os.close(leader)
    else:
        out = subprocess.run([sys.executable, "-c", CHECK], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=env, text=True, check=True)
    return json.loads(out.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("env", [
    {}, {"TTY_COMPATIBLE": "0"}, {"TTY_COMPATIBLE": "1"}, {"FORCE_COLOR": "1"}, {"FORCE_COLOR": ""},
    {"TTY_COMPATIBLE": "0", "FORCE_COLOR": "1"},
])
@pytest.mark.parametrize("tty", [False, True], ids=["pipe", "tty"])
def test_is_terminal_agrees_with_rich(env, tty):
    lazy, real, loaded = is_terminal_in_child(env, tty=tty)
    assert lazy == real
    if not real:
        assert not loaded  # a plain "no" needs no rich


def test_printing_goes_through_rich():
    buffer = io.StringIO()
    console = LazyConsole(file=buffer, width=40)
    console.print("[bold]tagged[/] 3")
    assert buffer.getvalue() == "tagged 3\n"
    assert isinstance(console.rich, Console) and console.rich is console.rich
    assert console.is_terminal is False and console.quiet is False
    assert LazyConsole(quiet=True).quiet is True


def test_preload_builds_the_console_on_a_thread():
    console = LazyConsole(file=io.StringIO())
    console.preload()
    for _ in range(500):
        if console._console is not None:
            break
        time.sleep(0.01)
    assert isinstance(console._console, Console)
