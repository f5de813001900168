"""The operator's image loader: what each `images` entry names, each distinct source read once (a URL that fails
for a moment gets `try_num` attempts), within the size cap, hashed once, and prepared only when it is sent."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, TypeVar, Union

from vlmtag.images import EncodedImage, FetchLimits, ImageError, read_source
from vlmtag.images.light import read_header
from vlmtag.urls import is_remote, scheme_of

T = TypeVar("T")


@dataclass(frozen=True)
class ImageBytes:
    """An image's raw bytes and their hex SHA-256 (the cache key's image part)."""

    data: bytes = field(repr=False)
    sha256: str

    @classmethod
    def of(cls, data: bytes) -> "ImageBytes":
        return cls(data, hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class BadEntry:
    """An `images` entry that names no image; `error` goes to the error field as it is."""

    error: str


#: What to load for one entry: a path or URL, bytes the row carries, or why there is nothing to load.
Source = Union[str, bytes, BadEntry]


def source_and_key(path: Any, raw: Any, base_dir: str | None, where: tuple[int, int]) -> tuple[Source, tuple]:
    """What to load for one entry of `images` (`raw`: the bytes a row carries for it, if any), and the key that
    makes identical images load once. `where` (row, position) keeps bad entries apart."""
    if raw is not None:
        if isinstance(raw, dict):  # Hugging Face `datasets` image column: {"bytes": ..., "path": ...}
            raw = raw.get("bytes")
        if isinstance(raw, (bytes, bytearray, memoryview)):
            data = bytes(raw)
            # Keyed by the bytes themselves: Python's hash is cheaper than SHA-256 here, which the loader
            # computes later, on its pool, only once per distinct image.
            return data, ("bytes", data)
        return BadEntry(f"bad image bytes entry: expected bytes, got {type(raw).__name__}"), ("bad", where)
    if isinstance(path, str) and path:
        return path, ("path", resolve(path, base_dir))
    return BadEntry(f"bad image entry: expected a path or URL, got {path!r:.40}"), ("bad", where)


def resolve(path: str, base_dir: str | None) -> str:
    """`path` as one name for the same file, however a row spells it (only for telling duplicates apart)."""
    if scheme_of(path) or base_dir is None or os.path.isabs(path):  # a URL, file:// too, is never joined
        return path
    return os.path.normpath(os.path.join(base_dir, path))


class ImageLoader:
    """Reads and prepares images on one thread pool, shared by every batch of the operator (the streaming
    dispatcher runs its loader threads on it too)."""

    def __init__(self, *, limits: FetchLimits, try_num: int, workers: int, wait: Callable[[int], float],
                 geometry: dict[str, Any] | None = None) -> None:
        self.limits = limits
        self.geometry = geometry or {}  # prepare_image's options: max_aspect_ratio, min_side, pad_to_aspect, reencode
        self.try_num = try_num
        self.workers = workers
        # Local reads and preparing are CPU work: one thread per core. More only queue for the cores, delaying the
        # API engine's event loop (2 cores, 512 photos, 0.5 s server: 9.40 s with 4 threads, 9.27 s with 2); only
        # reads that wait on the network use all `workers`.
        self.cpu_workers = min(workers, os.cpu_count() or 1)
        self._wait = wait  # seconds to wait after the n-th failed attempt
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def read(self, sources: Sequence[Source], base_dir: str | None) -> list[ImageBytes | str]:
        """Each source's bytes, or why they could not be read."""
        return self._map(lambda source: self.load(source, base_dir), sources, self.parallelism(sources, base_dir))

    def prepare(self, images: Sequence[ImageBytes], max_pixels: int) -> list[EncodedImage | str]:
        """Each image decoded, downscaled and encoded for the model, or why it could not be."""
        return self._map(lambda image: self.prepare_one(image, max_pixels), images, self.cpu_workers)

    def parallelism(self, sources: Sequence[Source], base_dir: str | None) -> int:
        """Images of these sources worth loading at once: all `workers` when reads wait on the network."""
        return self.workers if any(_remote(x, base_dir) for x in sources) else self.cpu_workers

    def prepare_one(self, image: ImageBytes, max_pixels: int) -> EncodedImage | str:
        """One image ready for the model (its original bytes when they need no work), or why it cannot be."""
        return _prepare(image, max_pixels, self.geometry)

    def submit(self, fn: Callable[[], Any]) -> None:
        """Run `fn` on the pool, for what it does (its result and exceptions are its own business)."""
        self._ensure_pool().submit(fn)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _ensure_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="vlmtag-image")
            return self._pool

    def load(self, source: Source, base_dir: str | None) -> ImageBytes | str:
        """One source's bytes, or why they could not be read."""
        if isinstance(source, BadEntry):
            return source.error
        if isinstance(source, bytes):
            return ImageBytes.of(source)
        try:
            if not _remote(source, base_dir):  # a local file or a data: URI: another attempt would change nothing
                return ImageBytes.of(read_source(source, base_dir=base_dir, limits=self.limits))
            # a URL that timed out or answered 429/5xx gets the same attempt budget as a request
            from tenacity import Retrying, retry_if_exception, stop_after_attempt  # only datasets that fetch load it

            for attempt in Retrying(stop=stop_after_attempt(self.try_num), reraise=True,
                                    wait=lambda state: self._wait(state.attempt_number),
                                    retry=retry_if_exception(lambda e: getattr(e, "retryable", False))):
                with attempt:
                    # hashed here, on the pool, where hashlib releases the GIL for large buffers
                    return ImageBytes.of(read_source(source, base_dir=base_dir, limits=self.limits))
        except ImageError as e:
            return str(e)
        raise AssertionError("unreachable: Retrying returns or raises")

    def _map(self, fn: Callable[[Any], T], items: Sequence[Any], workers: int) -> list[T]:
        """`fn` over `items` on the pool (reading and resizing release the GIL), one contiguous chunk per worker:
        a task per image would cost more in futures and GIL hand-offs than small images cost to prepare, and
        slow the API engine's event loop, which shares the GIL."""
        if len(items) <= 1:
            return [fn(x) for x in items]
        pool = self._ensure_pool()
        size = -(-len(items) // workers)
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        return [y for done in pool.map(lambda chunk: [fn(x) for x in chunk], chunks) for y in done]


@contextlib.contextmanager
def batch_scheduling() -> Iterator[None]:
    """Image work is CPU-bound and never urgent: on Linux, the calling thread runs as SCHED_BATCH meanwhile. Same
    share of the CPU, but when it wakes (its read done, the GIL back) it no longer preempts the thread running, so
    the API engine's event loop and a server on this machine answer sooner (2 cores, 512 photos, a 0.5 s server:
    ~16 ms less over the job's 16 rounds). Only from the default policy (a user's `chrt` is left alone), and back
    to it afterwards: the pool's threads run other work too."""
    try:
        changed = os.sched_getscheduler(0) == os.SCHED_OTHER
        if changed:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed: the default scheduling is fine
        changed = False
    try:
        yield
    finally:
        if changed:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def _remote(source: Source, base_dir: str | None) -> bool:
    """Whether reading `source` waits on the network (a URL, or a relative path under a remote dataset)."""
    return isinstance(source, str) and (is_remote(source) or is_remote(base_dir or ""))


def _prepare(image: ImageBytes, max_pixels: int, geometry: dict[str, Any]) -> EncodedImage | str:
    try:
        im, pad, mime = read_header(image.data, max_pixels=max_pixels, **geometry)
        if mime is not None:  # the light path: sent as it is
            return EncodedImage(image.data, mime, im.size[0], im.size[1], image.sha256)
        # NumPy, OpenCV and simplejpeg load with the first image that needs decoding (~0.2 s): a job of images
        # that all go as they are never pays for them
        from vlmtag.images.prepare import prepare_opened

        return prepare_opened(image.data, im, pad, image.sha256, max_pixels=max_pixels,
                              max_aspect_ratio=geometry.get("max_aspect_ratio"))
    except ImageError as e:
        return str(e)
