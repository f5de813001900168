"""Batch mode as a job: the batch phase (`runner.BatchRun`), then the export written by the normal run
(`vlmtag.run.run_job`), where every answered image is a cache hit and every request that failed for good gets its
error without a request. Also the job's commands: status, cancel, export (request files without a provider) and
ingest (results produced elsewhere, e.g. by `vllm run-batch`)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from vlmtag.atomic import write_text
from vlmtag.batch.client import BatchApiError, BatchClient
from vlmtag.batch.requests import RequestFiles, SealedFile, request_line, walk
from vlmtag.batch.results import outcome, read_lines
from vlmtag.batch.runner import BatchProgress, BatchRun, BatchStopped
from vlmtag.batch.state import TERMINAL, BatchState
from vlmtag.cache import SqliteAnswerCache
from vlmtag.errors import ConfigError
from vlmtag.io import Shard
from vlmtag.jobs import Job
from vlmtag.ops.base import Operator, Pipeline
from vlmtag.run import RunResult, run_job
from vlmtag.run.execute import ProgressCallback
from vlmtag.run.plan import Plan, count_unreadable, job_identity, plan, recipe_shards
from vlmtag.stats import RunStats
from vlmtag.tags import TagParseError

log = logging.getLogger(__name__)

#: The error of an image+prompt the batches never answered (a guard: the batch phase leaves none).
NO_ANSWER = "no answer from the Batch API (run the same command again to ask for it)"
NOT_INGESTED = "no answer in the ingested results"


@dataclass
class BatchJob:
    """A job as batch mode sees it: its one operator, plan, job folder and batch state."""

    op: Operator
    pipeline: Pipeline
    shards: list[Shard]
    plan: Plan
    job: Job
    state: BatchState
    cache_path: str
    limit: int | None
    export_type: str | None
    dataset_label: str
    work_dir: str | None
    export_arg: str  # the export path as given (a folder export may end with "/")

    @property
    def options(self):
        return self.op.options

    def client(self) -> BatchClient:
        return BatchClient(self.op.engine_settings())

    def previous(self) -> RunStats | None:
        """The stats of the job's last finished run (None: it has not finished)."""
        if not self.job.completed() or not os.path.exists(self.plan.stats_path):
            return None
        if not all(os.path.exists(o) for o in self.plan.outputs):
            return None
        return RunStats.read(self.plan.stats_path)

    # -- the export ---------------------------------------------------------------------------------------------

    def export(self, *, errors: dict[str, str], otherwise: str | None, progress: ProgressCallback | None = None,
               usage: dict | None = None) -> RunResult:
        """Write the export with the normal run: answers from the cache, `errors` without a request; anything else
        gets `otherwise` (None: asked online)."""
        self.op.settle(errors, otherwise=otherwise)
        usage = usage if usage is not None else self.usage()
        return run_job(self.pipeline, self.shards, self.export_arg, work_dir=self.work_dir, use_cache=True,
                       cache_path=self.cache_path, limit=self.limit, export_type=self.export_type,
                       dataset_label=self.dataset_label, progress=progress,
                       adjust_stats=lambda stats: self.add_usage(stats, usage))

    def usage(self) -> dict:
        u = self.state.usage
        return {"requests": u.requests, "retries": u.retries, "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens}

    def add_usage(self, stats: RunStats, usage: dict) -> None:
        """What the job's batches did, at the batch price (the online prices × `batch_price_discount`)."""
        stats.requests += usage.get("requests", 0)
        stats.retries += usage.get("retries", 0)
        stats.prompt_tokens += usage.get("prompt_tokens", 0)
        stats.completion_tokens += usage.get("completion_tokens", 0)
        if self.op.pricing.known:
            batch = self.op.pricing.cost(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
            stats.cost = (stats.cost or 0.0) + batch * self.options.batch_price_discount

    def stopped(self, why: str, *, interrupted: bool = False) -> RunResult:
        stats = RunStats()
        self.add_usage(stats, self.usage())
        return RunResult(self.plan.export_path, self.plan.stats_path, stats, aborted=why, interrupted=interrupted,
                         work_dir=self.job.dir, outputs=self.plan.outputs)


def open_batch_job(ops: Sequence[Operator] | Pipeline, shards: list[Shard], export_path: str, *,
                   work_dir: str | None = None, cache_path: str | None = None, limit: int | None = None,
                   export_type: str | None = None, dataset_label: str = "") -> BatchJob:
    """The batch view of the job `run_job` would run with the same arguments (same identity, same folder)."""
    pipeline = ops if isinstance(ops, Pipeline) else Pipeline(ops)
    if len(pipeline) != 1:
        raise ConfigError(f"batch mode runs one tagger per job; this recipe has {len(pipeline)} in 'process'")
    (op,) = pipeline
    if not hasattr(op, "batch_requests"):
        raise ConfigError(f"batch mode: operator {op.name!r} cannot prepare batch requests")
    the_plan = plan(shards, export_path, export_type=export_type, work_dir=work_dir)
    job = Job(the_plan.state_root, job_identity(the_plan, pipeline, mode="tag", limit=limit))
    cache_path = cache_path or os.path.join(the_plan.state_root, "cache.sqlite")
    bj = BatchJob(op, pipeline, shards, the_plan, job, BatchState(os.path.join(job.dir, "batch")), cache_path,
                  limit, export_type, dataset_label, work_dir, export_path)
    return bj


def open_recipe_job(recipe, *, limit: int | None = None) -> BatchJob:
    from vlmtag.config import build_ops

    ops = build_ops(recipe)
    shards = recipe_shards(recipe.dataset_path)
    extra = recipe.model_extra or {}
    if recipe.executor_type == "ray":
        log.warning("batch mode writes the export on this machine: executor_type 'ray' is not used")
    return open_batch_job(ops, shards, recipe.export_path, work_dir=recipe.work_dir, cache_path=extra.get("cache_path"),
                          limit=limit, export_type=extra.get("export_type"), dataset_label=recipe.dataset_path)


# -- running -------------------------------------------------------------------------------------------------


def run_batch(bj: BatchJob, *, use_cache: bool = True, fallback: bool = False, strict: bool = False,
              progress: ProgressCallback | None = None, batch_progress: Callable[[BatchProgress], None] | None = None,
              note: Callable[[str], None] | None = None) -> RunResult:
    """The whole batch job: submit or re-attach, wait, ask again for what failed, then write the export."""
    op = bj.op
    if not use_cache:
        raise ConfigError("batch mode keeps every answer in the answer cache: it cannot run with use_cache: false "
                          "(or --no-cache)")
    if getattr(op, "engine_kind", "api") != "api":
        raise ConfigError(f"{op.name}: batch_api: true needs an API model (is_api_model: true); for a local model "
                          "use `vlmtag batch export` and `vlmtag batch ingest`")
    if strict:
        count, first = count_unreadable(bj.shards, bj.pipeline.batch_size, bj.limit)
        if count:
            raise ConfigError(f"--strict: unreadable rows: {count:,} (first at {first})")
    previous = bj.previous()
    if previous is not None and not previous.failed:
        return bj.export(errors={}, otherwise=NO_ANSWER, progress=progress)  # says it is already complete
    client = bj.client()
    cache = SqliteAnswerCache(bj.cache_path)
    op.attach_cache(cache)
    try:
        with bj.state.lock():
            bj.state = BatchState(bj.state.dir)  # as the last run left it, now that no other run changes it
            if previous is not None:
                bj.state.forget_final()  # its failed requests get new attempts, as an online rerun gives them
            BatchRun(op, bj.shards, bj.job, bj.state, client, limit=bj.limit, fallback=fallback, note=note,
                     progress=batch_progress).run()
    except BatchStopped as e:
        return bj.stopped(str(e))
    except KeyboardInterrupt:
        return bj.stopped("interrupted; the batches go on at the provider and the same command picks them up",
                          interrupted=True)
    finally:
        op.attach_cache(None)
        cache.close()
        client.close()
        op.close()
    return bj.export(errors=bj.state.final, otherwise=None if fallback else NO_ANSWER, progress=progress)


def run_batch_job(ops: Sequence[Operator] | Pipeline, shards: list[Shard], export_path: str, *,
                  work_dir: str | None = None, use_cache: bool = True, cache_path: str | None = None,
                  limit: int | None = None, export_type: str | None = None, dataset_label: str = "",
                  **kwargs) -> RunResult:
    """`run_job` through the Batch API (see `run_batch` for the keyword arguments)."""
    bj = open_batch_job(ops, shards, export_path, work_dir=work_dir, cache_path=cache_path, limit=limit,
                        export_type=export_type, dataset_label=dataset_label)
    return run_batch(bj, use_cache=use_cache, **kwargs)


def run_batch_recipe(recipe, *, limit: int | None = None, **kwargs) -> RunResult:
    return run_batch(open_recipe_job(recipe, limit=limit), use_cache=recipe.use_cache, **kwargs)


# -- status and cancel ---------------------------------------------------------------------------------------


@dataclass
class BatchLine:
    batch_id: str
    status: str
    total: int
    completed: int
    failed: int
    age_s: float
    round: int
    error: str | None = None  # why the provider could not be asked (the last known state is shown)


def status(bj: BatchJob, *, now: float | None = None) -> tuple[list[BatchLine], list[str]]:
    """Each of the job's batches as the provider sees it now (the last known state when it cannot be asked), and
    what is left. Reads the state only: works while a run is polling."""
    now = time.time() if now is None else now
    state = bj.state
    lines: list[BatchLine] = []
    client = None
    try:
        for entry in state.files:
            if not entry.batch_id:
                continue
            st, counts, error = entry.status or "?", dict(entry.counts), None
            if not entry.ingested and (entry.status or "") not in TERMINAL:
                try:
                    client = client or bj.client()
                    obj = client.retrieve(entry.batch_id)
                    st, counts = str(obj.get("status")), dict(obj.get("request_counts") or {})
                except BatchApiError as e:
                    error = str(e)
            lines.append(BatchLine(entry.batch_id, st, int(counts.get("total") or entry.requests),
                                   int(counts.get("completed") or 0), int(counts.get("failed") or 0),
                                   now - (entry.created_at or now), entry.round, error))
    finally:
        if client is not None:
            client.close()
    left = []
    if bj.previous() is not None and bj.job.completed():
        left.append(f"the job is complete: {bj.plan.export_path}")
        return lines, left
    live = [f for f in state.files if f.live]
    waiting = [f for f in live if not f.batch_id]
    u = state.usage
    left.append(f"answered: {u.answered:,} requests in {u.batches:,} finished batches; failed for good: "
                f"{len(state.final):,}")
    if live:
        left.append(f"left: {sum(f.requests for f in live if f.batch_id):,} requests in "
                    f"{len(live) - len(waiting)} running batches")
    if waiting:
        left.append(f"left: {sum(f.requests for f in waiting):,} requests in {len(waiting)} files not yet submitted")
    if state.retry:
        left.append(f"left: {state.retry:,} requests to ask again in a follow-up batch")
    if not state.exists:
        left.append("left: everything (no batch was submitted for this job yet)")
    elif not state.walk_complete:
        left.append("left: the requests of the rest of the dataset (not all submitted yet)")
    if not live and not state.retry and state.walk_complete:
        left.append("left: nothing to wait for: `vlmtag run` writes the export")
    return lines, left


def cancel(bj: BatchJob) -> list[tuple[str, str]]:
    """Cancel the job's running batches: (batch id, status or why not). A run polling them stops once they end,
    keeping what they completed; the next run submits the rest."""
    bj.state.request_cancel()
    done = []
    live = [f for f in bj.state.files if f.batch_id and not f.ingested and (f.status or "") not in TERMINAL]
    if not live:
        return done
    with bj.client() as client:
        for entry in live:
            try:
                obj = client.cancel(entry.batch_id)
                done.append((entry.batch_id, str(obj.get("status"))))
            except BatchApiError as e:
                done.append((entry.batch_id, f"not cancelled: {e}"))
    return done


# -- without a provider: export and ingest -----------------------------------------------------------------


def export_requests(bj: BatchJob, folder: str) -> dict:
    """Write request files (each image+prompt the cache cannot answer, split under the limits) and
    `index.jsonl` (`custom_id` -> file and rows) into `folder`, submitting nothing. Returns the manifest."""
    op, o = bj.op, bj.options
    os.makedirs(folder, exist_ok=True)
    files: list[dict] = []
    where: dict[str, str] = {}
    rows: dict[str, list[list[int]]] = {}
    settings = op.engine_settings()

    def sealed(f: SealedFile) -> None:
        files.append({"file": os.path.basename(f.path), "requests": len(f.keys), "bytes": f.bytes})
        for key in f.keys:
            where[key] = os.path.basename(f.path)

    writer = RequestFiles(folder, 0, max_requests=o.batch_max_requests, max_bytes=o.batch_max_bytes,
                          name=lambda n: f"requests-{n:05d}.jsonl", on_seal=sealed, keys_file=False)
    cache = SqliteAnswerCache(bj.cache_path)
    op.attach_cache(cache)
    seen: set[str] = set()
    try:
        for _, _, first_row, work in walk(op, bj.shards, bj.job, limit=bj.limit, want=lambda k: k not in seen):
            for key, request in work.requests.items():
                seen.add(key)
                writer.add(key, request_line(key, request, settings))
            for i, keys in enumerate(work.keys):
                for j, key in enumerate(keys):
                    if key in seen:
                        rows.setdefault(key, []).append([first_row + i, j])
        writer.close()
    finally:
        writer.abandon()
        op.attach_cache(None)
        cache.close()
        op.close()
    index = os.path.join(folder, "index.jsonl")
    write_text(index, "".join(json.dumps({"custom_id": k, "file": where[k], "rows": rows.get(k, [])}) + "\n"
                              for k in where))
    manifest = {"job": bj.job.id, "model": o.api_or_hf_model, "files": files, "requests": len(where),
                "index": "index.jsonl", "rows": "[row number in the dataset, image position in the row]"}
    write_text(os.path.join(folder, "manifest.json"), json.dumps(manifest, indent=2) + "\n")
    return manifest


@dataclass
class Ingested:
    lines: int = 0
    answered: int = 0
    failed: int = 0
    unknown: int = 0  # lines without a usable custom_id
    errors: dict = field(default_factory=dict)
    usage: dict = field(default_factory=lambda: {"requests": 0, "retries": 0, "prompt_tokens": 0,
                                                 "completion_tokens": 0})


def ingest(bj: BatchJob, paths: Iterable[str]) -> Ingested:
    """Read result files produced elsewhere (`vllm run-batch -o`, a provider's output and error files): good
    answers into the cache, the others as errors for the export."""
    op = bj.op
    got = Ingested()
    good: list[tuple[str, str]] = []
    answered: set[str] = set()
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"batch ingest: {path}: no such file")
        for doc in read_lines(path):
            line = outcome(doc, op.options.response_path)
            got.lines += 1
            got.usage["prompt_tokens"] += line.prompt_tokens
            got.usage["completion_tokens"] += line.completion_tokens
            if line.not_run:
                continue
            got.usage["requests"] += 1
            error = line.error
            if error is None:
                try:
                    op.parse_output(line.text or "")
                    good.append((line.custom_id, line.text or ""))
                    answered.add(line.custom_id)
                    got.errors.pop(line.custom_id, None)
                    continue
                except TagParseError as e:
                    error = f"unparsable answer: {e}"
            if line.custom_id not in answered:
                got.errors[line.custom_id] = error
    cache = SqliteAnswerCache(bj.cache_path)
    try:
        cache.put_many(good)
    finally:
        cache.close()
    got.answered, got.failed = len(answered), len(got.errors)
    return got


def finish_ingested(bj: BatchJob, got: Ingested, *, progress: ProgressCallback | None = None) -> RunResult:
    """The export after `ingest`: answers from the cache, the ingested errors, and "no answer" for the rest."""
    return bj.export(errors=got.errors, otherwise=NOT_INGESTED, progress=progress, usage=got.usage)
