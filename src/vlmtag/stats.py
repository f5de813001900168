"""Run counters, shared by the operator (which fills them) and the summary (which shows them)."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


def reason_kind(error: str) -> str:
    """Group errors for the summary: the part before the first ':' (errors read "<kind>: <detail>")."""
    head = error.split(":", 1)[0].strip()
    return head[:80] or "error"


@dataclass
class TaggingStats:
    rows: int = 0
    rows_skipped: int = 0  # already had the tag field
    images: int = 0
    tagged: int = 0
    cached: int = 0  # answers taken from the cache (no request)
    failed: int = 0
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failure_reasons: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def add_failure(self, error: str) -> None:
        with self._lock:
            self.failed += 1
            self.failure_reasons[reason_kind(error)] += 1

    def merge(self, other: dict) -> None:
        """Add counters reported by a worker (another process or a Ray actor), as given by `as_dict`."""
        with self._lock:
            for name, value in other.items():
                if name == "failure_reasons":
                    self.failure_reasons.update(value)
                elif isinstance(value, int):
                    setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict:
        with self._lock:
            d = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
            d["failure_reasons"] = dict(self.failure_reasons.most_common())
            return d
