"""What the operator needs from a cache: look up many keys at once, store answers as they arrive."""

from __future__ import annotations

from typing import Iterable, Mapping, Protocol


class AnswerCache(Protocol):
    def get_many(self, keys: Iterable[str]) -> Mapping[str, str]:
        """The cached raw answers for those keys that have one."""

    def put_many(self, items: Iterable[tuple[str, str]]) -> None:
        """Store (key, raw answer) pairs; storing an existing key again is harmless."""

    def close(self) -> None: ...
