"""How much decoded image memory preparation may hold at once, across every thread of the process.

A pixel cap per image is not enough: 32 threads each decoding a near-limit 88-megapixel RGBA PNG would hold
tens of GiB. So each decode first reserves its estimated size (from the header: width x height x bytes per pixel,
with room for the conversion to RGB) from one `DecodeBudget`; decodes run side by side only while their sum fits,
and an image bigger than the whole budget is decoded alone.

The allocator is part of it (glibc only, `tune_allocator`, once per process, at the first decode):
- glibc serves the large blocks of a decode from per-thread arenas, which keep them after they are freed (one
  decode after another in many threads grows the process by GiBs): every allocation of 8 MiB or more is made its
  own mapping, given back on free;
- setting that turns glibc's adaptive thresholds off, which left the trim threshold at 128 KiB: every smaller
  buffer freed at the top of a heap (a photo's file, decoded and resized pixels, request body: a few MiB) went
  back to the system, and the next image faulted it in again, page by page (measured: 560,000 page faults and
  2 s of kernel time on 512 photos). Up to 32 MiB free at the top of a heap is kept for the next image instead
  (≈27,000 faults, 0.4 s).
Settings the user made (``MALLOC_*_`` variables, ``GLIBC_TUNABLES``) are left as they are.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from typing import Iterator

log = logging.getLogger(__name__)

#: The default budget: a quarter of the machine's memory, at most 2 GiB.
MAX_DEFAULT_BUDGET = 2 << 30
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 8 << 20
_TRIM_THRESHOLD = 32 << 20


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
            tune_allocator()
            _default = DecodeBudget(default_budget_bytes())
        return _default


_tuned = False


def tune_allocator() -> None:
    """Large allocations as their own mappings, smaller freed ones kept for reuse (see the module docstring;
    glibc only, elsewhere nothing changes). Once per process."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ or \
            "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return  # the user's own settings
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: its C library among them
    except OSError:
        return
    if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt"):  # glibc: musl's mallopt does nothing
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    else:
        log.debug("not glibc; the allocator keeps its defaults")
