"""A tagging run: plan inputs and outputs, run the operators on an executor batch by batch (checkpointed),
then merge the finished batches into the export and write its stats.

Resume is always on: a run is a job identified by its dataset, export and operator settings; finished batches
are kept in `<work_dir>/.vlmtag/jobs/<id>/`, so rerunning the same command after a crash does only what is left.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

from vlmtag import __version__
from vlmtag.cache import SqliteAnswerCache
from vlmtag.config import Recipe, build_ops
from vlmtag.errors import ConfigError
from vlmtag.executors import WorkItem, run_local
from vlmtag.io import Shard, UnsupportedFormat, format_of, open_dataset, open_writer
from vlmtag.io.base import FORMATS
from vlmtag.io.dataset import ShardReadError
from vlmtag.jobs import Job
from vlmtag.ops import RunAborted
from vlmtag.rowkeys import META_KEY
from vlmtag.stats import reason_kind

log = logging.getLogger(__name__)
STATE_DIR = ".vlmtag"


@dataclass
class RunResult:
    export_path: str
    stats_path: str
    rows_written: int
    wall_seconds: float
    stats: dict
    aborted: str | None = None
    interrupted: bool = False
    already_complete: bool = False
    work_dir: str = ""
    outputs: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        n = self.stats.get("images_processed", 0)
        return n / self.wall_seconds if self.wall_seconds > 0 else 0.0


@dataclass
class Plan:
    """Which output file each input shard goes to."""

    shards: list[Shard]
    outputs: list[str]  # one per shard; the same path for every shard when the export is one file
    export_path: str

    @property
    def targets(self) -> list[tuple[str, list[int]]]:
        """(output path, indices of the shards written into it), in order."""
        order: dict[str, list[int]] = {}
        for i, out in enumerate(self.outputs):
            order.setdefault(out, []).append(i)
        return list(order.items())


def is_folder_export(export_path: str) -> bool:
    return export_path.endswith(("/", os.sep)) or os.path.isdir(export_path) or not os.path.splitext(export_path)[1]


def plan(shards: list[Shard], export_path: str, export_type: str | None = None) -> Plan:
    if not is_folder_export(export_path):
        try:
            format_of(export_path)
        except UnsupportedFormat as e:
            raise ConfigError(f"export_path: {e}") from None
        return Plan(shards, [export_path] * len(shards), export_path)
    if export_type and f".{export_type}" not in FORMATS:
        raise ConfigError(f"export_type={export_type!r}: expected one of {', '.join(f[1:] for f in FORMATS)}")
    outputs, seen = [], set()
    for shard in shards:
        stem, ext = os.path.splitext(shard.name)
        ext = f".{export_type}" if export_type else (ext if ext in FORMATS else ".jsonl")
        name = stem + ext
        if name in seen:
            raise ConfigError(f"export_path: two input shards would both write {name!r}; export to one file instead")
        seen.add(name)
        outputs.append(os.path.join(export_path, name))
    return Plan(shards, outputs, export_path.rstrip("/" + os.sep))


def stats_path_for(export_path: str) -> str:
    return export_path.rstrip("/" + os.sep) + ".stats.json"


def provenance(ops: Sequence) -> dict:
    """What produced the tags (never client settings such as API keys)."""
    info = []
    for op in ops:
        o = op.options
        prompts = (op.system_prompt + "\x00" + op.input_template).encode()
        info.append(
            {
                "op": "image_tagging_vlm_mapper",
                "engine": op.engine_kind,
                "model": o.api_or_hf_model,
                "tag_field_name": op.tag_field_name,
                "prompt_sha256": hashlib.sha256(prompts).hexdigest()[:16],
                "sampling_params": o.sampling_params,
                "json_schema": o.json_schema,
                "max_pixels": o.max_pixels,
                "max_tags": o.max_tags,
                "max_tag_length": o.max_tag_length,
            }
        )
    return {"vlmtag_version": __version__, "ops": info}


def _shard_identity(shard: Shard) -> dict:
    ident = {"path": os.path.abspath(shard.path) if shard.rows is None else shard.path, "kind": shard.kind}
    try:
        st = os.stat(shard.path)
        ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns)  # a changed input is a new job
    except OSError:
        pass
    return ident


class OutputCounts:
    """Counts taken from the rows as written, so a resumed job reports the whole export, not one process."""

    def __init__(self, tag_field: str) -> None:
        self.tag_field, self.error_field = tag_field, tag_field + "_errors"
        self.rows = self.images = self.tagged = self.failed = 0
        self.reasons: dict[str, int] = {}

    def add(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self.rows += 1
            meta = row.get(META_KEY)
            if not isinstance(meta, dict):
                continue
            tags = meta.get(self.tag_field) or []
            errors = meta.get(self.error_field) or [None] * len(tags)
            for t, e in zip(tags, errors):
                if e:
                    self.failed += 1
                    self.images += 1
                    kind = reason_kind(str(e))
                    self.reasons[kind] = self.reasons.get(kind, 0) + 1
                elif t:
                    self.tagged += 1
                    self.images += 1

    def as_dict(self) -> dict:
        reasons = dict(sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        return {"rows": self.rows, "images": self.images, "tagged": self.tagged, "failed": self.failed,
                "failure_reasons": reasons}


def iter_batches(shards: list[Shard], batch_size: int, limit: int | None) -> Iterator[tuple[int, int, list[dict]]]:
    left = limit
    for s, shard in enumerate(shards):
        for b, rows in enumerate(shard.batches(batch_size)):
            if left is not None:
                if left <= 0:
                    return
                rows = rows[:left]
                left -= len(rows)
            yield s, b, rows


def run_job(
    ops: Sequence,
    shards: list[Shard],
    export_path: str,
    *,
    work_dir: str | None = None,
    use_cache: bool = True,
    cache_path: str | None = None,
    limit: int | None = None,
    export_type: str | None = None,
    dataset_label: str = "",
    prepare_rows: Callable[[list[dict]], list[dict]] | None = None,
    mode: str = "tag",
    progress: Callable[[dict], None] | None = None,
    executor: Callable[..., None] = run_local,
) -> RunResult:
    """Tag `shards` into `export_path`, resuming a job with the same identity if one was interrupted.

    `executor(ops, items, done)` runs the work items through the operators and calls `done(item, rows)` for
    each, in input order (`executors.run_local` by default).
    """
    the_plan = plan(shards, export_path, export_type)
    work_dir = work_dir or os.path.dirname(os.path.abspath(the_plan.export_path))
    state_root = os.path.join(work_dir, STATE_DIR)
    batch_size = ops[0].options.batch_size
    identity = {
        "mode": mode,
        "shards": [_shard_identity(s) for s in shards],
        "export": os.path.abspath(the_plan.export_path),
        "outputs": [os.path.abspath(o) for o in the_plan.outputs],
        "ops": provenance(ops)["ops"],
        "fingerprints": [op.fingerprint for op in ops],
        "batch_size": batch_size,
        "limit": limit,
    }
    job = Job(state_root, identity)
    stats_path = stats_path_for(the_plan.export_path)
    finished = job.completed()
    if finished and all(os.path.exists(o) for o in the_plan.outputs) and os.path.exists(stats_path):
        with open(stats_path, encoding="utf-8") as f:
            stats = json.load(f)
        if not stats.get("failed"):
            return RunResult(the_plan.export_path, stats_path, stats.get("rows", 0), 0.0, stats,
                             already_complete=True, work_dir=job.dir, outputs=the_plan.outputs)
        # Finished with failures: run it again. Answers that came back are in the cache (no request);
        # only what failed is asked again.
        log.warning("the last run of this job had %d failed images; running it again to retry them", stats["failed"])
        job.restart()

    remote = getattr(executor, "builds_own_ops", False)
    for op in ops:
        # Build the engine now so bad settings fail before any data is read; but never load a local model
        # into the driver when workers load their own (that memory, or GPU, would be wasted).
        if not (remote and op.engine_kind in ("hf", "vllm")):
            op.setup()
    cache = None
    if use_cache:
        cache = SqliteAnswerCache(cache_path or os.path.join(state_root, "cache.sqlite"))
        for op in ops:
            op.cache = cache
    start = time.perf_counter()
    resumed_rows = 0
    done_rows = 0

    def items() -> Iterator[WorkItem]:
        nonlocal resumed_rows
        for s, b, rows in iter_batches(shards, batch_size, limit):
            if job.is_done(s, b):
                resumed_rows += len(rows)
                continue
            if prepare_rows is not None:
                rows = prepare_rows(rows)
            yield WorkItem((s, b), rows, shards[s].base_dir)

    def done(item: WorkItem, rows: list[dict]) -> None:
        nonlocal done_rows
        job.write_chunk(*item.key, rows)
        done_rows += len(rows)
        if progress is not None:
            progress({**ops[0].stats.as_dict(), "rows": done_rows, "resumed_rows": resumed_rows})

    aborted = None
    interrupted = False
    try:
        executor(ops, items(), done)
    except (RunAborted, ShardReadError) as e:  # finished batches stay checkpointed for the resume
        aborted = str(e)
    except KeyboardInterrupt:
        aborted, interrupted = "interrupted", True
    finally:
        for op in ops:
            op.close()
        if cache is not None:
            cache.close()

    run_counts = ops[0].stats.as_dict()
    this_run = {
        "rows_processed": run_counts["rows"],
        "rows_resumed": resumed_rows,
        "rows_already_tagged": run_counts["rows_skipped"],
        "images_processed": run_counts["images"],
        "cached": run_counts["cached"],
        "requests": run_counts["requests"],
        "retries": run_counts["retries"],
        "prompt_tokens": run_counts["prompt_tokens"],
        "completion_tokens": run_counts["completion_tokens"],
    }
    if ops[0].pricing.known:
        this_run["cost"] = round(sum(op.spent() for op in ops), 6)
    if aborted:
        wall = time.perf_counter() - start
        stats = {**this_run, "failure_reasons": run_counts["failure_reasons"], "failed": run_counts["failed"],
                 "tagged": run_counts["tagged"], "rows": done_rows, "images": run_counts["images"]}
        return RunResult(the_plan.export_path, stats_path, 0, wall, stats, aborted=aborted,
                         interrupted=interrupted, work_dir=job.dir, outputs=the_plan.outputs)

    counts = OutputCounts(ops[0].tag_field_name)
    for out, indices in the_plan.targets:
        writer = open_writer(out)
        try:
            for s in indices:
                for rows in job.read_shard(s):
                    counts.add(rows)
                    writer.write(rows)
        except BaseException:
            writer.abort()
            raise
        writer.commit()
    wall = time.perf_counter() - start
    stats = {**counts.as_dict(), **this_run}
    result = RunResult(the_plan.export_path, stats_path, counts.rows, wall, stats, work_dir=job.dir,
                       outputs=the_plan.outputs)
    _write_stats(result, the_plan, dataset_label, ops)
    job.mark_complete({"export": the_plan.export_path, "rows": counts.rows, "finished": time.time()})
    return result


def _write_stats(result: RunResult, the_plan: Plan, dataset_label: str, ops: Sequence) -> None:
    roots = {s.base_dir for s in the_plan.shards}
    doc = {
        "export_path": result.export_path,
        "dataset_path": dataset_label,
        "images_root": roots.pop() if len(roots) == 1 else None,
        "parts": [{"output": o, "shard": s.path, "images_root": s.base_dir}
                  for o, s in zip(the_plan.outputs, the_plan.shards)],
        "completed": True,
        "rows_written": result.rows_written,
        **result.stats,
        "wall_seconds": round(result.wall_seconds, 3),
        "images_per_second": round(result.images_per_second, 3),
        "provenance": provenance(ops),
    }
    tmp = result.stats_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")
    os.replace(tmp, result.stats_path)


def _without_failures(tag_field: str) -> Callable[[list[dict]], list[dict]]:
    """For --retry-failed: rows with a failed image lose their tag fields, so the operator tags them again
    (the images that had tags come back from the cache)."""
    error_field = tag_field + "_errors"

    def prepare(rows: list[dict]) -> list[dict]:
        for row in rows:
            meta = row.get(META_KEY)
            if isinstance(meta, dict) and any(meta.get(error_field) or []):
                row[META_KEY] = {k: v for k, v in meta.items() if k not in (tag_field, error_field)}
        return rows

    return prepare


def _retry_shards(recipe: Recipe) -> list[Shard]:
    """The existing export's parts as input, each with the folder its images resolve against."""
    path = recipe.export_path
    stats_file = stats_path_for(path)
    if not os.path.exists(stats_file):
        raise ConfigError(f"--retry-failed: no finished export at {path} (missing {stats_file})")
    with open(stats_file, encoding="utf-8") as f:
        stats = json.load(f)
    roots = {os.path.abspath(p["output"]): p["images_root"] for p in stats.get("parts", [])}
    shards = []
    for shard in open_dataset(path):
        root = roots.get(os.path.abspath(shard.path), stats.get("images_root") or shard.base_dir)
        shards.append(Shard(shard.path, shard.kind, root))
    return shards


def run_recipe(
    recipe: Recipe,
    *,
    limit: int | None = None,
    retry_failed: bool = False,
    progress: Callable[[dict], None] | None = None,
) -> RunResult:
    ops = build_ops(recipe)
    if retry_failed:
        shards = _retry_shards(recipe)
    else:
        try:
            shards = open_dataset(recipe.dataset_path)
        except FileNotFoundError as e:
            raise ConfigError(f"recipe: dataset_path: {e}") from None
        except UnsupportedFormat as e:
            raise ConfigError(f"recipe: dataset_path: {e}") from None
    extra = recipe.model_extra or {}
    return run_job(
        ops,
        shards,
        recipe.export_path,
        work_dir=recipe.work_dir,
        use_cache=recipe.use_cache,
        cache_path=extra.get("cache_path"),
        limit=limit,
        export_type=extra.get("export_type"),
        dataset_label=recipe.dataset_path,
        prepare_rows=_without_failures(ops[0].tag_field_name) if retry_failed else None,
        mode="retry-failed" if retry_failed else "tag",
        progress=progress,
        executor=_pick_executor(recipe, ops),
    )


def _pick_executor(recipe: Recipe, ops: Sequence) -> Callable[..., None]:
    """`executor_type: ray` -> Ray Data; `np` > 1 -> that many processes, except for API engines (one process
    already keeps `concurrency` requests in flight); else the local executor."""
    if recipe.executor_type == "ray":
        from vlmtag.executors.ray import ray_executor

        return _builds_own_ops(ray_executor(recipe.ray_address, np=recipe.np))
    if recipe.np > 1:
        if any(op.engine_kind == "api" for op in ops):
            log.warning("np=%d is not used with an API engine: one process keeps `concurrency` requests in flight "
                        "(raise `concurrency` instead)", recipe.np)
        else:
            from vlmtag.executors.processes import run_processes

            return _builds_own_ops(functools.partial(run_processes, workers=recipe.np))
    return run_local


def _builds_own_ops(executor: functools.partial) -> functools.partial:
    executor.builds_own_ops = True  # its workers build engines from `op.spec`; the driver needs none
    return executor


def inline_shard(paths: Sequence[str], base_dir: str) -> Shard:
    """Image files, folders (walked recursively, sorted) or URLs given on the command line, as one shard."""
    rows = list(image_rows(paths))  # walks folders first, so a typo fails before any work

    def batches(n: int) -> Iterator[list[dict]]:
        it = iter(rows)
        while batch := list(itertools.islice(it, n)):
            yield batch

    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:12]  # other files: another job
    return Shard(f"{','.join(paths)}#{digest}", "inline", base_dir, rows=batches)


def image_rows(paths: Sequence[str]) -> Iterator[dict]:
    from vlmtag.io.folder import image_paths

    for path in paths:
        if "://" in path or os.path.isfile(path):
            yield {"images": [path]}
        elif os.path.isdir(path):
            for rel in image_paths(path):  # the same walk as a folder-of-images dataset
                yield {"images": [os.path.join(path, rel)]}
        else:
            raise ConfigError(f"{path}: no such file or folder")
