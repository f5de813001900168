"""The command's console: rich's `Console`, built on first use.

rich costs ~50 ms of imports. A `vlmtag run` whose output is not a terminal prints nothing before its summary, so
building the console only when something is printed (or a bar drawn) keeps those imports off the path to the
first request; `preload` builds it on a background thread while a run waits on its server, so the summary does
not pay for them at the end either.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


class LazyConsole:
    """Stands for `rich.console.Console(**options)`: every attribute is the real console's, built on first use;
    `quiet` and a `False` from `is_terminal` are answered without it."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None
        self._lock = threading.Lock()

    @property
    def rich(self) -> "Console":
        """The real console (for rich objects that take one, such as `Progress`)."""
        with self._lock:
            if self._console is None:
                from rich.console import Console

                self._console = Console(**self._options)
            return self._console

    @property
    def quiet(self) -> bool:
        return bool(self._options.get("quiet", False))

    @property
    def is_terminal(self) -> bool:
        """rich's answer; without building the console where rich's own rules say no: TTY_COMPATIBLE=0, an empty
        FORCE_COLOR, or stdout not a tty and neither TTY_COMPATIBLE=1 nor FORCE_COLOR saying otherwise."""
        if self._console is None and not self._options.get("force_terminal") and self._options.get("file") is None:
            compatible = os.environ.get("TTY_COMPATIBLE", "")
            if compatible == "0":
                return False
            force_color = os.environ.get("FORCE_COLOR")
            if compatible != "1" and (force_color == "" or force_color is None and not _isatty(sys.stdout)):
                return False
        return self.rich.is_terminal

    def preload(self) -> None:
        """Build the console, and load rich's tables (every summary is one), on a daemon thread, now."""

        def load() -> None:
            _ = self.rich
            import rich.table  # noqa: F401

        threading.Thread(target=load, name="vlmtag-console", daemon=True).start()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not the console's public surface (and copy/pickle probes before __init__)
            raise AttributeError(name)
        return getattr(self.rich, name)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no such method, or a closed stream
        return False
