"""How much decoded image memory preparation may hold at once, across every thread of the process.

A pixel cap per image is not enough: 32 threads each decoding a near-limit 88-megapixel RGBA PNG would hold
tens of GiB. So each decode first reserves its estimated size (from the header: width x height x bytes per pixel,
with room for the conversion to RGB) from one `DecodeBudget`; decodes run side by side only while their sum fits,
and an image bigger than the whole budget is decoded alone.

The allocator is part of it: glibc serves the large blocks of a decode from per-thread arenas, which keep them
after they are freed (one decode after another in many threads grows the process by GiBs). `return_memory_to_os`
makes every allocation of 8 MiB or more its own mapping, given back on free.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import threading
from typing import Iterator

log = logging.getLogger(__name__)

#: The default budget: a quarter of the machine's memory, at most 2 GiB.
MAX_DEFAULT_BUDGET = 2 << 30
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 8 << 20


def default_budget_bytes() -> int:
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return MAX_DEFAULT_BUDGET
    return max(256 << 20, min(total // 4, MAX_DEFAULT_BUDGET))


class DecodeBudget:
    """Bytes of decoded pixels that may be held at once; `reserve` waits until an estimate fits."""

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 1:
            raise ValueError("a decode budget must be at least 1 byte")
        self.limit = limit_bytes
        self.used = 0
        self.peak = 0  # the most reserved at once (for tests and benchmarks)
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold `nbytes` (at most the whole budget: a bigger image waits until it can be decoded alone)."""
        need = max(0, min(nbytes, self.limit))
        with self._cond:
            while self.used and self.used + need > self.limit:
                self._cond.wait()
            self.used += need
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= need
                self._cond.notify_all()


_default: DecodeBudget | None = None
_default_lock = threading.Lock()


def process_budget() -> DecodeBudget:
    """The budget every preparation in this process shares unless given its own."""
    global _default
    with _default_lock:
        if _default is None:
            return_memory_to_os()
            _default = DecodeBudget(default_budget_bytes())
        return _default


_tuned = False


def return_memory_to_os() -> None:
    """Large allocations as their own mappings (glibc only; elsewhere nothing changes). Once per process."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    except OSError:
        log.debug("no mallopt here; the allocator keeps its defaults")
