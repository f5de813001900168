"""Fail fast: tell a broken run (bad or revoked key, wrong model, server down) from images that fail."""

from __future__ import annotations

import collections
import threading

from vlmtag.engines import Response

_AUTH_STATUSES = frozenset({401, 403, 404})


class RunAborted(RuntimeError):
    """Stop the whole run: the engine is failing for everything, so more rows would only be more error rows."""


class FailFast:
    """Decides when failures mean the run itself is broken. Two rules: `streak` final failures in a row with
    the same 401/403/404 (an answer about the whole run, not one image); or at least `ratio` of the last `window`
    images failed once `min_seen` were seen."""

    def __init__(self, window: int = 100, min_seen: int = 50, ratio: float = 0.95, streak: int = 3) -> None:
        self._lock = threading.Lock()
        self._recent: collections.deque[bool] = collections.deque(maxlen=window)
        self._min_seen, self._ratio, self._streak = min_seen, ratio, streak
        self._run: list[str] = []  # the current streak of same-status run-level failures (their errors)
        self._run_status: int | None = None

    def record(self, ok: bool, response: Response | None = None, error: str = "") -> None:
        with self._lock:
            self._recent.append(ok)
            status = response.status if response is not None and not response.retryable else None
            if ok or status not in _AUTH_STATUSES:
                self._run, self._run_status = [], None
            elif status == self._run_status:
                self._run.append(error)
            else:
                self._run, self._run_status = [error], status

    @property
    def suspect(self) -> bool:
        """The latest final failures may be the start of a run-level streak (same 401/403/404), not yet decided."""
        with self._lock:
            return bool(self._run)

    def check(self) -> None:
        with self._lock:
            if len(self._run) >= self._streak:
                raise RunAborted(f"{len(self._run)} requests in a row failed with the same error: {self._run[0]}")
            failures = self._recent.count(False)
            if len(self._recent) >= self._min_seen and failures >= self._ratio * len(self._recent):
                raise RunAborted(f"{failures} of the last {len(self._recent)} images failed; stopping the run")
