"""Streaming requests, for engines that send requests one at a time (`Engine.streams`: the API engine).

Each distinct image of a batch is loaded: read, hashed, looked up in the cache, prepared, encoded. A few loader
threads of the image loader's pool take images in order (earlier batches first) and each request leaves as soon as
its image is ready: no image waits for the rest of its batch, and a retry waits for its own backoff only, not
for a round. The dispatcher decides, for all the batches of one operator that run at once:

- at most `concurrency` requests are out, and no request leaves before the answers that came back before it
  have been committed to the answer cache (answers that arrive while nothing is ready to go are committed
  together), so a crash asks again at most what was in flight;
- at most `concurrency` images are loaded ahead of sending (256 when they are small): the prepared payloads
  held are those in flight plus those at most, and each is dropped once its request is answered;
- the cost budget, reserved per request; the fail-fast rules after every answer; and a first wave of requests
  that reaches no server stops the run.

There is no dispatcher thread: its state sits behind one lock, and whichever thread brings news (a loader
thread with a prepared image, the engine's thread with an answer, a batch's own thread when a retry is due)
updates it and sends what may go. At high request rates this spares two thread hand-offs per image.
"""

from __future__ import annotations

import collections
import functools
import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from vlmtag.engines import Engine, Request, Response
from vlmtag.ops.fail_fast import RunAborted
from vlmtag.ops.loader import batch_scheduling
from vlmtag.ops.requests import RequestRunner, TakeAnswer

#: Runs on a loader thread: for each image of a chunk (images of one batch), its requests still to ask, by key,
#: each with its wire form.
LoadImages = Callable[[list[Any]], "list[dict[int, tuple[Request, Any]]]"]
_Wave = list  # of (wire form, on_response): what one `Engine.send` starts
_CHUNK_SECONDS = 0.002  # a loader takes as many images at once as it loads in this time
_CHEAP_SECONDS = 0.001  # images that load faster than this are cheap (see Dispatcher._cheap)
_CHEAP_LOOKAHEAD = 256
_NOT_STARTED, _STARTING, _STARTED = range(3)  # the engine's start (`Dispatcher._start_engine`)


@dataclass(eq=False)
class _Batch:
    load: LoadImages
    take: TakeAnswer
    parallel: int  # loader threads worth running for this batch (reads that wait on the network: more)
    images_left: int  # images not loaded yet
    requests: dict[int, tuple[Request, Any]] = field(default_factory=dict)  # not finished yet
    attempts: dict[int, int] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    failure: BaseException | None = None
    dropped: bool = False  # its caller stopped waiting (Ctrl-C): nothing more is sent for it
    done: bool = False

    @property
    def finished(self) -> bool:
        return self.images_left == 0 and not self.requests


class Dispatcher:
    """Sends the requests of an operator's batches through a streaming engine; see the module's docstring."""

    def __init__(self, engine: Engine, runner: RequestRunner, *, concurrency: int,
                 spawn: Callable[[Callable[[], None]], None], commit: Callable[[], None]) -> None:
        self._engine = engine
        self._runner = runner
        self._concurrency = concurrency
        self._spawn = spawn  # runs a loader loop on the image loader's pool
        self._commit = commit  # writes the answers kept so far to the cache, in one transaction
        self._cond = threading.Condition(threading.Lock())  # guards everything below
        self._active: list[_Batch] = []
        self._images: collections.deque[tuple[_Batch, Any]] = collections.deque()  # not loaded yet
        self._ready: collections.deque[tuple[_Batch, int]] = collections.deque()  # prepared, not sent
        self._retries: list[tuple[float, int, _Batch, int]] = []  # heap of (when, tie-break, batch, key)
        self._tie = itertools.count()
        self._engine_state = _NOT_STARTED
        self._closed = False
        self._engine_error: Exception | None = None  # why it could not start
        self._loaders = 0  # loader loops running
        self._loading = 0  # images being loaded
        self._out = 0  # requests sent whose answer has not been kept yet
        self._uncommitted = False
        self._unreached = 0  # responses that reached no server, before any did
        self._abort: BaseException | None = None
        self._image_seconds = 0.01  # how long an image takes to load (moving average); first guess: a photo's

    def run(self, images: Sequence[Any], load: LoadImages, take: TakeAnswer, *, parallel: int) -> dict[int, str]:
        """Load a batch's images (`load`, a chunk at a time) and send their requests until each is answered or
        has had `try_num` attempts. Returns the final error of each request that failed; raises `RunAborted` when
        the run should stop (once the requests already out have been answered and kept)."""
        if not images:
            return {}
        batch = _Batch(load=load, take=take, parallel=parallel, images_left=len(images))
        with self._cond:
            self._active.append(batch)
            self._images.extend((batch, image) for image in images)
            go = self._step()
        self._go(*go)
        try:
            while True:
                with self._cond:
                    if not batch.done:
                        self._cond.wait(self._until_due())
                    if batch.done:
                        break
                    go = self._step()  # a retry may be due
                self._go(*go)
        except BaseException:
            with self._cond:
                batch.dropped = True
                batch.images_left -= sum(1 for b, _ in self._images if b is batch)
                self._images = collections.deque(x for x in self._images if x[0] is not batch)
            raise
        if batch.failure is not None:
            raise batch.failure
        return batch.errors

    def start_engine(self) -> None:
        """Start the engine now, on the loader pool, rather than with the first batch (`_step` asks for it)."""
        with self._cond:
            go = self._step()
        self._go(*go)

    def close(self) -> None:
        """End every batch still running with `RunAborted` (the engine is about to go)."""
        with self._cond:
            self._closed = True
            self._abort = self._abort or RunAborted("the tagger was closed during the run")
            self._settle()

    # -- news, from whichever thread brings it (each takes the lock, then sends outside it) --------------------

    def _loader(self) -> None:
        """A loader thread: images in order, while the look-ahead allows. Images that take well under a
        millisecond (small ones) are loaded a few at a time, which spares lock and thread hand-offs (and cache
        look-ups) that would cost more than the images themselves."""
        with batch_scheduling():
            self._load_while_room()

    def _load_while_room(self) -> None:
        while True:
            with self._cond:
                room = self._lookahead - self._loading - len(self._ready)
                if self._abort is not None or not self._images or room <= 0:
                    self._loaders -= 1
                    return
                batch = self._images[0][0]
                chunk = []
                most = max(1, min(room, int(_CHUNK_SECONDS / self._image_seconds)))
                while self._images and self._images[0][0] is batch and len(chunk) < most:
                    chunk.append(self._images.popleft()[1])
                self._loading += len(chunk)
            started = time.perf_counter()
            try:
                results: list[dict[int, tuple[Request, Any]]] | BaseException = batch.load(chunk)
            except Exception as e:  # a bug in loading: its batch fails with it
                results = e
            seconds = (time.perf_counter() - started) / len(chunk)
            with self._cond:
                self._image_seconds += 0.2 * (seconds - self._image_seconds)
                self._loading -= len(chunk)
                batch.images_left -= len(chunk)
                if isinstance(results, BaseException):
                    batch.failure = batch.failure or results
                elif not batch.dropped:
                    for result in results:
                        for key, item in result.items():
                            batch.requests[key] = item
                            batch.attempts[key] = 0
                            self._ready.append((batch, key))
                go = self._step()
            self._go(*go)

    def _on_response(self, batch: _Batch, key: int, reserved: float, resp: Response) -> None:
        """An answer, on the engine's thread. It is parsed and kept before the lock is taken."""
        failure = None
        try:
            resp = batch.take(key, resp)
        except Exception as e:  # a bug in keeping the answer: the batch fails with it, the run goes no further
            failure, resp = e, Response(error=f"internal error: {e}", usage=resp.usage)
        with self._cond:
            if failure is not None:
                batch.failure = batch.failure or failure
            self._answered(batch, key, resp, reserved)
            go = self._step()
        self._go(*go)

    def _start_engine(self) -> None:
        """Start the engine (its client, thread and connections) on the loader pool, asked for with the first
        batch, so that it gets ready while the first images load. Until it is, prepared requests wait in line
        and the loaders go on; none of them blocks in `send`. An engine that cannot start (e.g. a CA bundle that
        is not there) stops this run and any later batch with why."""
        with self._cond:
            if self._closed:  # closed before the pool got here: nothing will be sent
                return
        try:
            self._engine.start()
        except Exception as e:
            error: Exception | None = e
        else:
            error = None
        with self._cond:
            self._engine_state, self._engine_error = _STARTED, error
            go = self._step()
        self._go(*go)

    # -- under the lock ------------------------------------------------------------------------------------------

    def _step(self) -> tuple[bool, _Wave, int, bool]:
        """Everything that follows from the news: retries that are due, the fail-fast verdict, batches that are
        done; and, to be done outside the lock (`_go`), whether to commit the answers kept so far, the requests
        to send, how many loader threads to start and whether to start the engine."""
        now = time.monotonic()
        while self._retries and self._retries[0][0] <= now:  # retries that are due go first in line
            _, _, batch, key = heapq.heappop(self._retries)
            self._ready.appendleft((batch, key))
        if self._abort is None:
            try:
                self._runner.check()
            except RunAborted as e:
                self._abort = e
        if self._engine_error is not None:
            self._abort = self._abort or self._engine_error
        wave: _Wave = []
        loaders = 0
        commit = start = False
        if self._abort is None:
            if self._engine_state == _NOT_STARTED:
                self._engine_state, start = _STARTING, True
            if self._engine_state == _STARTED:
                wave = self._wave()
            if wave and self._uncommitted:  # answers are in the cache before any more requests leave
                commit, self._uncommitted = True, False
            parallel = max((b.parallel for b in self._active), default=1) if not self._cheap else 1
            room = self._lookahead - self._loading - len(self._ready)
            if 2 * room < self._lookahead and self._ready:
                room = 0  # loaders start again once half the look-ahead is free: loading in bursts, not trickles
            loaders = max(0, min(parallel, len(self._images), room) - self._loaders)
            self._loaders += loaders
        self._settle()
        return commit, wave, loaders, start

    def _wave(self) -> _Wave:
        wave: _Wave = []
        while self._ready and self._out < self._concurrency:
            batch, key = self._ready[0]
            if batch.dropped:
                self._ready.popleft()
                batch.requests.pop(key, None)
                continue
            request, wire = batch.requests[key]
            try:
                reserved = self._runner.try_reserve([request])
            except RunAborted as e:
                self._abort = e
                break
            if reserved is None:  # the budget fits it only once the requests out have been priced
                break
            self._ready.popleft()
            self._out += 1
            wave.append((wire, functools.partial(self._on_response, batch, key, reserved)))
        return wave

    @property
    def _cheap(self) -> bool:
        """Images load in well under a millisecond each (small ones): one loader thread keeps up with any
        server, and more would only fight over the GIL with the engine's thread."""
        return self._image_seconds < _CHEAP_SECONDS

    @property
    def _lookahead(self) -> int:
        """Images loaded ahead of sending: `concurrency` (one round), or a batch's worth when they are cheap, so
        that loading them happens in bursts rather than a trickle of hand-offs between threads."""
        return self._concurrency if not self._cheap else max(self._concurrency, _CHEAP_LOOKAHEAD)

    def _go(self, commit: bool, wave: _Wave, loaders: int, start: bool) -> None:
        if commit:
            try:
                self._commit()
            except Exception as e:  # e.g. a full disk: answers that cannot be kept must not be paid for again
                with self._cond:
                    self._abort = self._abort or e
        if wave:
            self._engine.send(wave)
        if start:
            self._spawn(self._start_engine)
        for _ in range(loaders):
            self._spawn(self._loader)

    def _answered(self, batch: _Batch, key: int, resp: Response, reserved: float) -> None:
        runner = self._runner
        self._out -= 1
        runner.release(reserved)
        attempt = batch.attempts[key] = batch.attempts[key] + 1
        runner.count(resp, attempt)
        self._uncommitted = self._uncommitted or resp.ok
        self._note_reach(resp)
        again = runner.judge(resp, attempt)
        if again is None or isinstance(again, str):
            if again is not None:
                batch.errors[key] = again
            del batch.requests[key]
        else:
            heapq.heappush(self._retries, (time.monotonic() + again, next(self._tie), batch, key))
            self._cond.notify_all()  # the batches' threads wait until the first retry is due

    def _note_reach(self, resp: Response) -> None:
        """Stop the run when the first wave of requests (up to `concurrency`) all reached no server."""
        if self._runner.reached:
            return
        if not resp.unreachable:
            self._runner.reachable(resp)
            return
        self._unreached += 1
        nothing_else = not (self._out or self._loading or self._ready or self._images)
        if self._unreached >= self._concurrency or nothing_else:
            try:
                self._runner.unreachable(resp)
            except RunAborted as e:
                self._abort = self._abort or e

    def _keep(self) -> None:
        try:
            self._commit()
        except Exception as e:  # e.g. a full disk: answers that cannot be kept must not be paid for again
            self._abort = self._abort or e
        self._uncommitted = False

    def _until_due(self) -> float | None:
        return max(0.0, self._retries[0][0] - time.monotonic()) if self._retries else None

    def _settle(self) -> None:
        """Hand back the batches that are done (an abort ends them all, once nothing is out)."""
        if self._abort is not None:
            if self._out or self._loading:
                return  # the answers already paid for are kept first
            if self._uncommitted:
                self._keep()
            for batch in self._active:
                batch.failure = batch.failure or self._abort
                batch.done = True
            self._active.clear()
            self._images.clear()
            self._ready.clear()
            self._retries.clear()
            self._abort = None
            self._cond.notify_all()
            return
        finished = [b for b in self._active if b.finished]
        if not finished:
            return
        if self._runner.suspect and (self._out or self._loading or self._ready or self._retries):
            # The latest failures may be the start of a revoked key's streak: a batch holding them waits for
            # the verdict, so that an abort does not leave its rows checkpointed with the run's error.
            finished = [b for b in finished if not b.errors]
        if finished and self._uncommitted:
            self._keep()
        for batch in finished:
            self._active.remove(batch)
            batch.done = True
        self._cond.notify_all()
