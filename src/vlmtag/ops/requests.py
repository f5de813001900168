"""The operator's request policy: how many attempts a request gets and how long to wait between them, the
`max_cost` budget, and the fail-fast checks; and the round loop for engines that work in batches (`ops.stream`
sends requests one by one to engines that stream)."""

from __future__ import annotations

import random
import threading
import time
from typing import Callable, Sequence

from vlmtag.cost import Pricing, text_tokens, visual_tokens
from vlmtag.engines import Engine, Request, Response
from vlmtag.ops.fail_fast import FailFast, RunAborted
from vlmtag.stats import TaggingStats

MAX_RETRY_AFTER = 300.0  # seconds: a server asking for longer is not waited on for longer

#: Called as each response arrives: keeps an answer it can use and returns the response as it counts: the same
#: one when the answer was kept, else a failure (an answer it cannot parse becomes a retryable one).
TakeAnswer = Callable[[int, Response], Response]


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait after the `attempt`-th try (1-based): `base` doubling each try up to `cap`, plus up to
    `base` of jitter, so requests that failed together do not all come back together."""
    return min(base * 2.0 ** min(attempt - 1, 64), cap) + random.uniform(0, base)


class RequestRunner:
    """Sends an operator's requests to its engine. One per operator: the fail-fast window and the cost budget
    span all its batches, including batches that run at the same time on other threads."""

    def __init__(self, *, try_num: int, retry_backoff: float, max_backoff: float, fail_fast: bool,
                 max_cost: float | None, answer_tokens: int, pricing: Pricing, stats: TaggingStats) -> None:
        self.try_num = try_num
        self.retry_backoff = retry_backoff
        self.max_backoff = max_backoff
        self.fail_fast = fail_fast
        self.max_cost = max_cost
        self.answer_tokens = answer_tokens  # output tokens a first round is priced at, before any usage is known
        self.pricing = pricing
        self.stats = stats
        self._breaker = FailFast()
        self._reached = False  # some request got through to the server (or the first round is still out)
        self._budget_lock = threading.Condition()  # reentrant: _reserve waits around try_reserve
        self._reserved = 0.0

    def wait(self, attempt: int) -> float:
        return backoff(attempt, self.retry_backoff, self.max_backoff)

    def spent(self) -> float:
        """What the answers so far cost, from the tokens the server reported (0 without prices)."""
        return self.pricing.cost(self.stats.prompt_tokens, self.stats.completion_tokens)

    def run(self, engine: Engine, requests: dict[int, Request], take: TakeAnswer,
            commit: Callable[[], None] = lambda: None) -> dict[int, str]:
        """Send `requests` (by key) in rounds, each one `run_batch` of the engine (engines that work in batches),
        until each is answered or has had `try_num` attempts; `commit` runs after each round. Returns the final
        error of each request that failed; raises `RunAborted` when the run should stop."""
        errors: dict[int, str] = {}
        pending = list(requests)
        attempts = dict.fromkeys(pending, 0)
        while pending:
            try:
                responses = self._round(engine, requests, pending, attempts, take)
            finally:
                commit()
            wait = 0.0
            still: list[int] = []
            for k, resp in zip(pending, responses):
                assert resp is not None, "engine returned fewer responses than requests"
                again = self.judge(resp, attempts[k])
                if isinstance(again, str):
                    errors[k] = again
                elif again is not None:
                    still.append(k)
                    wait = max(wait, again)
            if not self._reached:
                if responses and all(r is not None and r.unreachable for r in responses):
                    self.unreachable(responses[0])
                else:
                    self._reached = True
            self.check()
            pending = still
            if pending:
                time.sleep(wait)
        return errors

    def judge(self, resp: Response, attempts: int) -> float | str | None:
        """What becomes of a request after its `attempts`-th response: None when it is answered, the seconds to
        wait before another attempt, or its final error (recorded for fail-fast)."""
        if resp.ok:
            self._breaker.record(True)
            return None
        if resp.retryable and attempts < self.try_num:
            # the server's Retry-After wins when it is longer than the backoff
            return max(self.wait(attempts), min(resp.retry_after or 0.0, MAX_RETRY_AFTER))
        return self._failed(resp, attempts)

    def count(self, resp: Response, attempt: int) -> None:
        """Count one response (the `attempt`-th of its request) in the stats."""
        self.stats.add(requests=1, retries=int(attempt > 1),
                       prompt_tokens=resp.usage.prompt_tokens, completion_tokens=resp.usage.completion_tokens)

    def check(self) -> None:
        """Raise `RunAborted` when the fail-fast rules say the run is broken."""
        if self.fail_fast:
            self._breaker.check()

    @property
    def suspect(self) -> bool:
        """Whether the latest final failures may yet turn out to be a run-level failure (see `FailFast`)."""
        return self.fail_fast and self._breaker.suspect

    @property
    def reached(self) -> bool:
        """Whether some request got through to the server (answered or refused by it) at least once."""
        return self._reached

    def reachable(self, resp: Response) -> None:
        """Note a response: any that is not `unreachable` shows the server can be reached."""
        if not resp.unreachable:
            self._reached = True

    def unreachable(self, resp: Response) -> None:
        """A first wave of requests in which none reached the server is a wrong address, as certain a
        configuration error as a 401: stop (the run can resume once the address is fixed) instead of failing every
        image. A server that goes away later gives per-image errors as any other failure."""
        if self.fail_fast:
            error = resp.error or "connection error"
            raise RunAborted(f"{error}; no request of the first round reached the server: check the address "
                             "(model_params.base_url, or --api-base)")
        self._reached = True

    def _round(self, engine: Engine, requests: dict[int, Request], batch: list[int], attempts: dict[int, int],
               take: TakeAnswer) -> list[Response | None]:
        """One attempt at each request of `batch`; the responses as `take` judged them, in `batch` order."""
        responses: list[Response | None] = [None] * len(batch)

        def on_response(i: int, resp: Response) -> None:
            # Runs as each answer arrives, so a crash loses only what was still in flight, and the counters
            # (tokens, cost) are current for the budget check of a round starting elsewhere.
            k = batch[i]
            attempts[k] += 1
            self.count(resp, attempts[k])
            responses[i] = take(k, resp)

        sent = [requests[k] for k in batch]
        reserved = self._reserve(sent)
        try:
            engine.run_batch(sent, on_response)
        finally:
            self.release(reserved)
        return responses

    def _reserve(self, requests: Sequence[Request]) -> float:
        """Stop before a round that could take the run past `max_cost`; else reserve its cost until the round
        ends (so rounds running at the same time cannot overshoot together)."""
        with self._budget_lock:
            while (reserved := self.try_reserve(requests)) is None:
                self._budget_lock.wait()  # another round holds a reservation: see what it really cost
            return reserved

    def try_reserve(self, requests: Sequence[Request]) -> float | None:
        """Reserve the cost of sending `requests` when it fits in `max_cost` (returns the amount, 0 without a
        `max_cost`); None when it would fit only once the requests already out have cost what they cost; raises
        `RunAborted` when it cannot fit at all."""
        if self.max_cost is None:
            return 0.0
        with self._budget_lock:
            spent, n = self.spent(), self.stats.requests
            if n:
                estimate = spent / n * len(requests)
            else:  # nothing answered yet: price each answer at the most it may take
                estimate = sum(self.pricing.cost(visual_tokens(r.image.width, r.image.height)
                                                 + text_tokens(r.system_prompt + r.user_text), self.answer_tokens)
                               for r in requests)
            if spent + self._reserved + estimate <= self.max_cost:
                self._reserved += estimate
                return estimate
            if self._reserved <= 0:
                raise RunAborted(f"max_cost={self.max_cost:g} reached: spent {spent:.4f} so far, the "
                                 f"next {len(requests)} requests would cost about {estimate:.4f}")
            return None

    def release(self, reserved: float) -> None:
        """Give back a reservation once its requests have been answered (and their cost counted)."""
        if reserved:
            with self._budget_lock:
                self._reserved -= reserved
                self._budget_lock.notify_all()

    def _failed(self, resp: Response, attempts: int) -> str:
        error = resp.error or "error"
        if attempts > 1:
            error = f"{error} (after {attempts} attempts)"
        self._breaker.record(False, resp, error)
        return error
