"""The batch phase of a job: walk the dataset for what it still needs, submit it, poll, take the results, ask
again for what failed, until nothing is left to wait for.

The answer cache is the join: a request's `custom_id` is the operator's cache key for its image+prompt, every
good answer goes into the cache, and the export is then written by the normal run, where each answered image
is a cache hit. What is in a live batch, already answered, or failed for good is never put into another batch.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from vlmtag.batch.client import BatchApiError, BatchClient
from vlmtag.batch.requests import RequestFiles, SealedFile, request_line, walk
from vlmtag.batch.results import outcome, read_lines
from vlmtag.batch.state import TERMINAL, BatchState, FileEntry
from vlmtag.engines.base import Response
from vlmtag.io import Shard
from vlmtag.jobs import Job
from vlmtag.ops import RunAborted
from vlmtag.ops.fail_fast import FailFast
from vlmtag.tags import TagParseError

log = logging.getLogger(__name__)

FIRST_POLL_S = 1.0
UNANSWERED_ATTEMPTS = 8  # a server that does not answer (or answers 5xx) this often stops the phase


class BatchStopped(RuntimeError):
    """The batch phase stops before its end (fail-fast, a refusal, `vlmtag batch cancel`); the state is kept and
    the same command resumes it."""


@dataclass
class BatchProgress:
    """What the progress line shows while batches run."""

    round: int = 1
    batches: Counter = field(default_factory=Counter)  # status -> live batches
    total: int = 0  # requests in live batches
    completed: int = 0
    failed: int = 0
    answered: int = 0  # good answers so far, over the whole job
    final_errors: int = 0
    waiting: int = 0  # requests waiting for a follow-up batch

    def describe(self) -> str:
        states = ", ".join(f"{n} {s}" for s, n in sorted(self.batches.items())) or "none live"
        return (f"batches: {states}; requests {self.completed:,}/{self.total:,} done, {self.failed:,} failed; "
                f"answered {self.answered:,}, failed for good {self.final_errors:,}, to ask again {self.waiting:,} "
                f"(round {self.round})")


class BatchRun:
    def __init__(self, op, shards: list[Shard], job: Job, state: BatchState, client: BatchClient, *,
                 limit: int | None = None, fallback: bool = False,
                 note: Callable[[str], None] | None = None,
                 progress: Callable[[BatchProgress], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.op, self.shards, self.job, self.state, self.client = op, shards, job, state, client
        self.options = op.options
        self.settings = op.engine_settings()
        self.limit, self.fallback = limit, fallback
        self._note = note or (lambda text: log.info("%s", text))
        self._progress = progress
        self._sleep = sleep
        self.started = time.time()
        self.first_poll = min(FIRST_POLL_S, self.options.batch_poll_interval)
        self._delay = self.first_poll
        self._misses: Counter = Counter()  # per custom_id: batches of this run that ended without running it
        self._breaker = FailFast()
        self._hold = False  # a quota refusal: submit no more until a live batch finishes

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Until every request the job needs is answered or failed for good. Raises `BatchStopped`."""
        state = self.state
        while True:
            cancelled = state.cancelled_since(self.started)
            if not cancelled:
                self._submit_sealed()
                if not state.walk_complete:
                    self._walk()
                    continue
            submitted = [f for f in state.live() if f.batch_id]
            if cancelled and not submitted:
                raise BatchStopped("the batches were cancelled with `vlmtag batch cancel`; what they completed is "
                                   "kept. Run the same command again to submit what is left")
            if not state.live():
                if state.retry == 0:
                    return
                if self.fallback:
                    self._note(f"batch: {state.retry:,} requests are left for a follow-up; sending them online "
                               "(--batch-fallback online)")
                    return
                state.new_round()
                continue
            if not submitted:  # files waiting for the provider's quota: wait, then try them again
                self._wait()
                self._hold = False
                continue
            self._poll(submitted)

    # -- phase 1: what the job still needs ---------------------------------------------------------------

    def _walk(self) -> None:
        """Read the dataset once, writing a request line for each image+prompt that has no answer in the cache,
        is in no live batch and has not failed for good; each file is submitted as soon as it is complete."""
        state = self.state
        live, final = state.live_keys(), state.final
        seen: set[str] = set()
        record_rows = not state.walk_complete and state.round == 1
        recorded = state.rows_recorded() if record_rows else set()

        def want(key: str) -> bool:
            return key not in seen and key not in live and key not in final

        def stop() -> None:
            if state.cancelled_since(self.started):
                raise BatchStopped("cancelled with `vlmtag batch cancel` while preparing requests; run the same "
                                   "command again to go on")

        files = RequestFiles(state.requests_dir, len(state.files), max_requests=self.options.batch_max_requests,
                             max_bytes=self.options.batch_max_bytes, name=lambda n: f"{n:05d}.jsonl",
                             on_seal=self._sealed)
        try:
            for s, b, first_row, work in walk(self.op, self.shards, self.job, limit=self.limit, want=want,
                                              stop=stop):
                if record_rows and (s, b) not in recorded:
                    state.record_rows([{"shard": s, "batch": b, "first_row": first_row, "keys": work.keys}])
                for key, request in work.requests.items():
                    seen.add(key)
                    files.add(key, request_line(key, request, self.settings))
            files.close()
        finally:
            files.abandon()
        state.walk_complete = True
        state.save()
        if not seen and state.round == 1 and not state.files:
            self._note("batch: every image already has its answer; nothing to submit")

    def _sealed(self, sealed: SealedFile) -> None:
        entry = FileEntry(n=sealed.n, round=self.state.round, requests=len(sealed.keys), bytes=sealed.bytes)
        assert entry.n == len(self.state.files), "request files are numbered in order"
        self.state.files.append(entry)
        self.state.save()
        self._submit(entry)

    # -- submitting -----------------------------------------------------------------------------------------

    def _submit_sealed(self) -> None:
        for entry in self.state.live():
            if entry.batch_id is None:
                self._submit(entry)

    def _submit(self, entry: FileEntry) -> None:
        """Upload the file and create its batch, each checkpointed the moment the provider answers."""
        if self._hold or self.state.cancelled_since(self.started):
            return
        state = self.state
        filename = f"vlmtag-{self.job.id}-{entry.name}.jsonl"
        if entry.file_id is None:
            if entry.uploading:
                entry.file_id = self._find_upload(filename, entry.bytes)
            if entry.file_id is None:
                entry.uploading = True
                state.save()
                obj = self._retrying(f"uploading requests {entry.name}",
                                     lambda: self.client.upload(state.request_path(entry), filename),
                                     lambda: self._find_upload(filename, entry.bytes))
                if obj is None:
                    return
                entry.file_id = obj if isinstance(obj, str) else str(obj["id"])
            entry.uploading = False
            state.save()
            self._note(f"batch: uploaded {entry.requests:,} requests ({entry.bytes / 1e6:.1f} MB) as {entry.file_id}")
        if entry.batch_id is None:
            file_id = entry.file_id
            if entry.creating:
                found = self._find_batch(file_id)
                if found is not None:
                    self._created(entry, found)
                    return
            entry.creating = True
            state.save()
            metadata = {"vlmtag_job": self.job.id, "vlmtag_file": entry.name, "vlmtag_round": str(entry.round)}
            obj = self._retrying(f"creating the batch of {file_id}", lambda: self.client.create(file_id, metadata),
                                 lambda: self._find_batch(file_id))
            if obj is None:
                return
            self._created(entry, obj)

    def _created(self, entry: FileEntry, obj: dict) -> None:
        entry.batch_id = str(obj["id"])
        entry.creating = False
        entry.status = obj.get("status")
        entry.counts = dict(obj.get("request_counts") or {})
        entry.created_at = float(obj.get("created_at") or time.time())
        self.state.save()
        self._delay = self.first_poll
        self._note(f"batch: created {entry.batch_id} ({entry.requests:,} requests, round {entry.round})")
        try:
            os.remove(self.state.request_path(entry))  # the provider has it now
        except OSError:
            pass

    def _retrying(self, what: str, call, find):
        """`call()` until the provider takes it. A rate limit or quota waits (saying so, with the provider's
        words) and asks again; any other refusal stops the phase. After a failure the answer may have been lost
        on the way back: `find()` looks for what the call made before it is sent again. None: on hold."""
        attempt = 0
        while True:
            try:
                return call()
            except BatchApiError as e:
                attempt += 1
                if not e.transient or (not e.quota and attempt > UNANSWERED_ATTEMPTS):
                    raise BatchStopped(f"{what} failed: {e}") from None
                if e.quota and self.state.live() and any(f.batch_id for f in self.state.live()):
                    if e.status != 429:  # a quota that frees as our own batches finish
                        log.warning("%s: refused (%s); waiting for a running batch to finish first", what, e)
                        self._hold = True
                        return None
                wait = e.retry_after if e.retry_after is not None else min(
                    self.first_poll * 2.0 ** attempt, self.options.batch_poll_interval)
                log.warning("%s: refused (%s); waiting %.0f s and trying again", what, e, wait)
                self._sleep(wait)
                found = find() if e.status is None or e.status >= 500 else None
                if found is not None:
                    return found

    def _find_upload(self, filename: str, size: int) -> str | None:
        try:
            for f in self.client.list_files("batch"):
                if f.get("filename") == filename and int(f.get("bytes") or -1) == size:
                    return str(f["id"])
        except BatchApiError as e:
            log.warning("cannot list the provider's files to look for an earlier upload: %s", e)
        return None

    def _find_batch(self, file_id: str) -> dict | None:
        try:
            for b in self.client.list_batches():
                if b.get("input_file_id") == file_id:
                    return b
        except BatchApiError as e:
            log.warning("cannot list the provider's batches to look for an earlier create: %s", e)
        return None

    # -- phase 2: polling and results ----------------------------------------------------------------------------

    def _wait(self) -> None:
        self._sleep(self._delay)
        self._delay = min(self._delay * 2, self.options.batch_poll_interval)

    def _poll(self, submitted: list[FileEntry]) -> None:
        """Wait, then look at each submitted batch once; take the results of those that ended."""
        self._wait()
        ended = changed = False
        for entry in submitted:
            try:
                obj = self.client.retrieve(entry.batch_id)
            except BatchApiError as e:
                if e.status == 404:
                    obj = {"status": "failed", "errors": {"data": [{"message": f"the provider has no batch "
                                                                    f"{entry.batch_id} ({e})"}]}}
                else:
                    log.warning("cannot look at batch %s now: %s", entry.batch_id, e)
                    continue
            status = str(obj.get("status") or "")
            counts = dict(obj.get("request_counts") or {})
            if status != entry.status or counts != entry.counts:
                entry.status, entry.counts = status, counts
                changed = True
            if status in TERMINAL:
                self._ingest(entry, obj)  # checkpoints the state
                ended, changed = True, False
        if changed:  # the last seen states, for the progress line and `vlmtag batch status` (once per poll)
            self.state.save()
        if ended:
            self._delay = self.first_poll
            self._hold = False
        self._report()

    def _report(self) -> None:
        if self._progress is None:
            return
        p = BatchProgress(round=self.state.round, answered=self.state.usage.answered,
                          final_errors=len(self.state.final), waiting=self.state.retry)
        for entry in self.state.live():
            p.batches[entry.status or ("not submitted" if not entry.batch_id else "?")] += 1
            p.total += entry.requests
            p.completed += int(entry.counts.get("completed") or 0)
            p.failed += int(entry.counts.get("failed") or 0)
        self._progress(p)

    def _ingest(self, entry: FileEntry, obj: dict) -> None:
        """Take a finished batch's results: good answers into the cache, failures counted per `custom_id`
        (asked again while attempts are left), tokens of every line. Checkpointed once, at the end, so a kill
        in the middle takes the whole batch again, counting nothing twice."""
        state, o = self.state, self.options
        keys = set(state.keys(entry))
        os.makedirs(state.results_dir, exist_ok=True)
        seen: set[str] = set()
        good: list[tuple[str, str]] = []
        usage = state.usage
        requests = retries = prompt = completion = 0
        attempts, final = dict(state.attempts), dict(state.final)
        retry, not_run = 0, []
        outcomes: list[Response] = []
        strangers = 0
        for kind in ("output_file_id", "error_file_id"):
            file_id = obj.get(kind)
            if not file_id:
                continue
            dest = os.path.join(state.results_dir, f"{entry.batch_id}.{kind.split('_')[0]}.jsonl")
            if not os.path.exists(dest):
                try:
                    self.client.download(str(file_id), dest)
                except BatchApiError as e:
                    raise BatchStopped(f"downloading the results of {entry.batch_id} failed: {e}") from None
            for doc in read_lines(dest):
                line = outcome(doc, o.response_path)
                cid = line.custom_id
                if cid not in keys:
                    strangers += 1
                    continue
                if cid in seen:
                    continue
                seen.add(cid)
                prompt += line.prompt_tokens
                completion += line.completion_tokens
                if line.not_run:
                    not_run.append(cid)
                    continue
                requests += 1
                retries += int(attempts.get(cid, 0) > 0)
                error, retryable = line.error, line.retryable
                if error is None:
                    try:
                        self.op.parse_output(line.text or "")
                        good.append((cid, line.text or ""))
                        attempts.pop(cid, None)
                        outcomes.append(Response(text=line.text))
                        continue
                    except TagParseError as e:
                        error, retryable = f"unparsable answer: {e}", True
                n = attempts[cid] = attempts.get(cid, 0) + 1
                outcomes.append(Response(error=error, retryable=retryable, status=line.status))
                if retryable and n < o.try_num:
                    retry += 1
                else:
                    final[cid] = f"{error} (after {n} attempts)" if n > 1 else error
                    attempts.pop(cid, None)
        if strangers:
            log.warning("batch %s: %d result lines name a custom_id it was not given; ignored", entry.batch_id,
                        strangers)
        not_run.extend(k for k in keys if k not in seen)
        status = str(obj.get("status"))
        if status == "failed":
            log.warning("batch %s failed: %s; its %d requests go into a follow-up batch", entry.batch_id,
                        provider_errors(obj), len(not_run))
        elif not_run:
            log.warning("batch %s ended %s with %d of its %d requests not run; they go into a follow-up batch",
                        entry.batch_id, status, len(not_run), entry.requests)
        if self.op.cache is not None and good:
            self.op.cache.put_many(good)  # before the checkpoint: a kill in between only takes them again
        state.attempts, state.final = attempts, final
        state.retry += retry + len(not_run)
        usage.requests += requests
        usage.retries += retries
        usage.answered += len(good)
        usage.prompt_tokens += prompt
        usage.completion_tokens += completion
        usage.batches += 1
        entry.ingested = True
        entry.status = status
        entry.counts = dict(obj.get("request_counts") or entry.counts)
        state.save()
        for name in os.listdir(state.results_dir):
            if name.startswith(f"{entry.batch_id}."):
                os.remove(os.path.join(state.results_dir, name))
        self._note(f"batch: {entry.batch_id} {status}: {len(good):,} answered, {retry:,} to ask again, "
                   f"{len(not_run):,} not run, {sum(1 for r in outcomes if not r.ok) - retry:,} failed for good")
        self._check(entry, obj, not_run, outcomes)

    def _check(self, entry: FileEntry, obj: dict, not_run: list[str], outcomes: list[Response]) -> None:
        """Fail-fast: per-request failures count as online ones do; a batch that failed, expired or was
        cancelled is not an image failure, but the same request left unrun by `try_num` batches stops the run."""
        if self.options.fail_fast:
            for resp in outcomes:
                self._breaker.record(resp.ok, resp, resp.error or "")
            try:
                self._breaker.check()
            except RunAborted as e:
                raise BatchStopped(str(e)) from None
        worst = 0
        for cid in not_run:
            self._misses[cid] += 1
            worst = max(worst, self._misses[cid])
        if worst >= self.options.try_num:
            status = str(obj.get("status"))
            why = f": {provider_errors(obj)}" if status == "failed" else ""
            raise BatchStopped(f"{worst} batches ended without running the same requests (the last: "
                               f"{entry.batch_id} {status}{why}); nothing was marked failed. Run the same command "
                               "again to submit them again")


def provider_errors(obj: dict) -> str:
    """The provider's `errors` of a failed batch, quoted (`code: message (line N)`; at most three)."""
    errors = obj.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else errors if isinstance(errors, list) else None
    if not data:
        return "no reason given"
    parts = []
    for e in data[:3]:
        if not isinstance(e, dict):
            parts.append(str(e))
            continue
        text = ": ".join(str(x) for x in (e.get("code"), e.get("message")) if x)
        if e.get("line") is not None:
            text += f" (line {e['line']})"
        parts.append(text or "error")
    more = f" (and {len(data) - 3} more)" if len(data) > 3 else ""
    return "; ".join(parts) + more
