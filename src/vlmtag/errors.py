"""User-facing configuration errors: one line naming the key, the value and what was expected."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from pydantic import ValidationError


class ConfigError(ValueError):
    """A bad recipe, flag or operator argument. The CLI prints it as one line, without a traceback."""


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def config_error(err: "ValidationError", where: str, known: Iterable[str] = ()) -> ConfigError:
    """Turn pydantic's report into one ConfigError line per problem."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key {key!r}{did_you_mean(key, known)}")
        elif e["type"] == "missing":
            lines.append(f"{where}: missing required key {key!r}")
        else:
            msg = e["msg"][0].lower() + e["msg"][1:]
            lines.append(f"{where}: {key}={_short(e.get('input'))}: expected {msg.removeprefix('input should be ')}")
    return ConfigError("; ".join(lines))


# Exit statuses of the `vlmtag` command.
EXIT_OK = 0  # the run completed (per-image failures are recorded and counted)
EXIT_ABORTED = 1  # stopped early (fail-fast, a broken shard); finished batches are kept for the resume
EXIT_CONFIG = 2  # a bad recipe or flag
EXIT_INTERRUPTED = 130  # Ctrl-C
