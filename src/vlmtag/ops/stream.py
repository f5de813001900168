"""Streaming requests, for engines that send requests one at a time (`Engine.streams`: the API engine).

Each distinct image of a batch is an image job on the image loader's pool: read, hash, cache look-up, prepare,
encode. Its request leaves as soon as that job is done: no image waits for the rest of its batch, and a retry
waits for its own backoff only, not for a round. One dispatcher thread per operator decides, for all the batches
that run at once:

- at most `concurrency` requests are out, and the slot of an answer is reused only after the answer has been
  kept (parsed, and committed to the answer cache in one transaction with every answer that arrived with it),
  so a crash asks again at most what was in flight;
- at most `lookahead` images are read or prepared ahead of sending, images of earlier batches first: prepared
  payloads held are those in flight plus `lookahead` at most, and each is dropped once its request is answered;
- the cost budget, reserved per request; the fail-fast rules after every answer; and a first wave of requests
  that reaches no server stops the run.
"""

from __future__ import annotations

import collections
import functools
import heapq
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from vlmtag.engines import Engine, Request, Response
from vlmtag.ops.fail_fast import RunAborted
from vlmtag.ops.requests import RequestRunner, TakeAnswer

#: Runs on the image loader's pool: the requests of one image still to ask, by key, each with its wire form.
ImageJob = Callable[[], "dict[int, tuple[Request, Any]]"]
#: Runs a job on the pool and calls back with its result (or the exception it raised).
Spawn = Callable[[ImageJob, Callable[[Any], None]], None]


@dataclass(eq=False)
class _Batch:
    take: TakeAnswer
    jobs: collections.deque  # image jobs not started yet
    parallel: int  # image jobs of this batch worth running at once (reads that wait on the network: more)
    jobs_left: int
    requests: dict[int, tuple[Request, Any]] = field(default_factory=dict)  # not finished yet
    attempts: dict[int, int] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    failure: BaseException | None = None
    dropped: bool = False  # its caller stopped waiting (Ctrl-C): nothing more is sent for it
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.jobs_left == 0 and not self.requests


class Dispatcher:
    """Sends the requests of an operator's batches through a streaming engine; see the module's docstring."""

    def __init__(self, engine: Engine, runner: RequestRunner, *, concurrency: int, lookahead: int, spawn: Spawn,
                 commit: Callable[[], None]) -> None:
        self._engine = engine
        self._runner = runner
        self._concurrency = concurrency
        self._lookahead = lookahead
        self._spawn = spawn
        self._commit = commit  # writes the answers kept so far to the cache, in one transaction
        self._events: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        # Everything below belongs to the dispatcher thread.
        self._active: list[_Batch] = []
        self._ready: collections.deque[tuple[_Batch, int]] = collections.deque()  # prepared, not sent
        self._retries: list[tuple[float, int, _Batch, int]] = []  # heap of (when, tie-break, batch, key)
        self._tie = itertools.count()
        self._running = 0  # image jobs on the pool
        self._out = 0  # requests sent whose answer has not been kept yet
        self._unreached = 0  # responses that reached no server, before any did
        self._abort: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="vlmtag-dispatch", daemon=True)
        self._thread.start()

    def run(self, jobs: Sequence[ImageJob], take: TakeAnswer, *, parallel: int) -> dict[int, str]:
        """Run a batch's image jobs and send their requests until each is answered or has had `try_num`
        attempts. Returns the final error of each request that failed; raises `RunAborted` when the run should
        stop (after the requests already out have been answered and kept)."""
        if not jobs:
            return {}
        batch = _Batch(take=take, jobs=collections.deque(jobs), parallel=parallel, jobs_left=len(jobs))
        self._events.put(("batch", batch))
        try:
            batch.done.wait()
        except BaseException:
            self._events.put(("drop", batch))
            raise
        if batch.failure is not None:
            raise batch.failure
        return batch.errors

    def close(self) -> None:
        """Stop the dispatcher thread; a batch still running ends with `RunAborted`."""
        if self._thread.is_alive():
            self._events.put(("stop",))
            self._thread.join(timeout=30)

    # -- the dispatcher thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # a bug here must fail the batches, not leave their callers waiting
            while True:
                for batch in self._active:
                    batch.failure = batch.failure or e
                    batch.done.set()
                self._active.clear()
                event = self._events.get()
                if event[0] == "stop":
                    return
                if event[0] == "batch":
                    self._active.append(event[1])

    def _serve(self) -> None:
        while True:
            timeout = max(0.0, self._retries[0][0] - time.monotonic()) if self._retries else None
            try:
                event: tuple | None = self._events.get(timeout=timeout)
            except queue.Empty:
                event = None
            while event is not None:  # everything that has arrived, then one commit for all of it
                if event[0] == "stop":
                    for batch in self._active:
                        batch.failure = batch.failure or RunAborted("the tagger was closed during the run")
                        batch.done.set()
                    return
                self._handle(event)
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    event = None
            try:
                self._commit()
            except Exception as e:  # e.g. a full disk: answers that cannot be kept must not be paid for again
                self._abort = self._abort or e
            self._due()
            if self._abort is None:
                try:
                    self._runner.check()
                except RunAborted as e:
                    self._abort = e
            if self._abort is None:
                self._send()
                self._start_jobs()
            self._settle()

    def _handle(self, event: tuple) -> None:
        kind, batch = event[0], event[1]
        if kind == "batch":
            self._active.append(batch)
        elif kind == "ready":
            self._running -= 1
            batch.jobs_left -= 1
            result = event[2]
            if isinstance(result, BaseException):
                batch.failure = batch.failure or result
                return
            for key, item in result.items():
                batch.requests[key] = item
                batch.attempts[key] = 0
                self._ready.append((batch, key))
        elif kind == "answer":
            self._answered(batch, *event[2:])
        elif kind == "drop":
            batch.dropped = True
            batch.jobs_left -= len(batch.jobs)
            batch.jobs.clear()

    def _answered(self, batch: _Batch, key: int, resp: Response, reserved: float) -> None:
        runner = self._runner
        self._out -= 1
        runner.release(reserved)
        attempt = batch.attempts[key] = batch.attempts[key] + 1
        runner.count(resp, attempt)
        try:
            resp = batch.take(key, resp)
        except Exception as e:  # a bug in keeping the answer: the batch fails with it, the run goes no further
            batch.failure = batch.failure or e
            resp = Response(error=f"internal error: {e}")
        self._note_reach(resp)
        again = runner.judge(resp, attempt)
        if again is None or isinstance(again, str):
            if again is not None:
                batch.errors[key] = again
            del batch.requests[key]
        else:
            heapq.heappush(self._retries, (time.monotonic() + again, next(self._tie), batch, key))

    def _note_reach(self, resp: Response) -> None:
        """Stop the run when the first wave of requests (up to `concurrency`) all reached no server."""
        if self._runner.reached:
            return
        if not resp.unreachable:
            self._runner.reachable(resp)
            return
        self._unreached += 1
        nothing_else = self._out == 0 and self._running == 0 and not self._ready and not any(
            b.jobs for b in self._active)
        if self._unreached >= self._concurrency or nothing_else:
            try:
                self._runner.unreachable(resp)
            except RunAborted as e:
                self._abort = self._abort or e

    def _due(self) -> None:
        """Retries whose wait is over go first in line."""
        now = time.monotonic()
        while self._retries and self._retries[0][0] <= now:
            _, _, batch, key = heapq.heappop(self._retries)
            self._ready.appendleft((batch, key))

    def _send(self) -> None:
        wave: list[tuple[Any, Callable[[Response], None]]] = []
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
            wave.append((wire, functools.partial(self._queue_answer, batch, key, reserved)))
        if wave:
            self._engine.send(wave)

    def _queue_answer(self, batch: _Batch, key: int, reserved: float, resp: Response) -> None:
        self._events.put(("answer", batch, key, resp, reserved))  # called on the engine's thread

    def _start_jobs(self) -> None:
        for batch in self._active:
            while batch.jobs and self._running < batch.parallel and self._running + len(self._ready) < self._lookahead:
                self._running += 1
                self._spawn(batch.jobs.popleft(), functools.partial(self._queue_ready, batch))

    def _queue_ready(self, batch: _Batch, result: Any) -> None:
        self._events.put(("ready", batch, result))  # called on a pool thread

    def _settle(self) -> None:
        if self._abort is not None:
            if self._out or self._running:
                return  # the answers already paid for are kept first
            for batch in self._active:
                batch.failure = batch.failure or self._abort
                batch.done.set()
            self._active.clear()
            self._ready.clear()
            self._retries.clear()
            self._abort = None
            return
        finished = [b for b in self._active if b.finished]
        if finished and self._runner.suspect and (self._out or self._running or self._ready or self._retries):
            # The latest failures may be the start of a revoked key's streak: a batch holding them waits for
            # the verdict, so that an abort does not leave its rows checkpointed with the run's error.
            finished = [b for b in finished if not b.errors]
        for batch in finished:
            self._active.remove(batch)
            batch.done.set()
