"""`executor_type: ray`: the same recipe on Ray Data, on this machine or a cluster.

The pipeline is read -> `map_batches` with an actor pool -> back to the driver:

- read: the driver streams its work items (batches of rows still to do; finished ones were skipped by the job
  layer) into a small Ray queue, and one read task turns each into a one-row block. A work item travels as a
  single binary value (its rows pickled: nested dicts and image bytes do not map well to Arrow columns). No
  more than (items per actor + 1) x pool size items are in Ray at once, and no more than 4 times that wait
  to be written in order, so memory stays flat however large the input.
- map: a pool of actors (Ray Data `ActorPoolStrategy`); each rebuilds the operators from their specs and builds
  its engine once; an actor with an API engine runs two items at once (see `calls_per_actor`). Pool size: the operator's `num_proc`, else the recipe's `np` (as Data-Juicer does). Each
  actor asks for `num_gpus` GPUs: the operator's `num_gpus` when given, else for a local model (hf/vllm)
  `tensor_parallel_size` or 1 when the cluster has GPUs, else 0. The operator's `concurrency` stays the number
  of API requests in flight per actor.
- back: results come back to the driver, are put in input order (a bounded reorder buffer) and handed to
  `done`, which writes the job's checkpoint chunks exactly as with the local executor. Resume state therefore
  lives with the driver (its `work_dir`); a rerun of the same recipe resumes from there.

Answer cache: each actor opens the driver's SQLite cache path. On one machine that is the very same cache
(WAL mode, safe for several processes). On a multi-node cluster, each node opens that path on its own disk:
caches per node, so an answer cached on another node is simply asked again. Keep `cache_path` on node-local
disk; do not put the SQLite file on a network filesystem (NFS locking is unreliable; SQLite can corrupt).

Where the driver runs: on a machine of the cluster (`ray_address: auto` there, e.g. through `ray job submit`).
Ray Client (`ray://`) is refused with a clear error: Ray Data does not run through it.

Images are read by the actors: relative paths resolve against the dataset's folder on the driver, so on a
multi-node cluster that folder must be at the same path on every node (a shared filesystem), or images must be
URLs or bytes inside the rows (WebDataset, Parquet image columns).
"""

from __future__ import annotations

import collections
import inspect
import logging
import os
import pickle
import queue as queue_module
import threading
from typing import Any, Iterable

from vlmtag.errors import ConfigError
from vlmtag.executors.base import Done, Executor, WorkItem
from vlmtag.executors.worker import OpWorker, WorkerResult, merge_stats, portable
from vlmtag.ops.base import Operator, Pipeline

log = logging.getLogger(__name__)

INSTALL_HINT = "executor_type: ray needs Ray, which is not installed: pip install 'vlmtag[ray]'"
_END = object()


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
        import ray.util.queue  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


def check_address(address: str | None) -> None:
    if address and address.startswith("ray://"):
        raise ConfigError(
            f"ray_address={address!r}: Ray Data does not run through Ray Client (ray://); run vlmtag on a node "
            "of the cluster with ray_address: auto, e.g. ray job submit --address http://HEAD:8265 -- vlmtag run "
            "--config recipe.yaml"
        )


def connect(ray: Any, address: str | None) -> bool:
    """Connect to (or start) Ray. True when this call did it, so the caller shuts it down again afterwards.

    `auto`: the cluster this machine belongs to (`ray start`, or `RAY_ADDRESS`), else (no cluster found and no
    `RAY_ADDRESS`) a new local instance; `local`: a new local instance; `head:6379`: that cluster (this machine
    must be able to join it). `ray://` (Ray Client) is refused: Ray Data does not run through Ray Client
    (ray-project/ray#41634; Data-Juicer also starts its Ray runs on the head node).
    """
    check_address(address)
    if ray.is_initialized():
        return False
    if address in (None, "", "local"):
        ray.init(address="local")
        return True
    try:
        ray.init(address=address)
    except (ConnectionError, ValueError, RuntimeError) as e:
        if address == "auto" and isinstance(e, ConnectionError) and not os.environ.get("RAY_ADDRESS"):
            log.warning("ray_address: auto found no running Ray cluster; starting a local Ray instance on this machine")
            ray.init(address="local")
            return True
        raise ConfigError(f"ray_address={address!r}: cannot connect to Ray: {str(e).splitlines()[0]}") from None
    return True


def pool_size(ops: Iterable[Operator], np: int) -> int:
    """The operator's `num_proc` when set (Data-Juicer's per-op override), else the recipe's `np`."""
    for op in ops:
        n = op.resources.num_proc
        if isinstance(n, int) and n > 0:
            return n
    return max(1, int(np))


def actor_resources(ops: Iterable[Operator], cluster_gpus: float) -> dict[str, float]:
    """CPUs and GPUs each actor asks Ray for (the largest any operator needs)."""
    num_cpus, num_gpus = 1.0, 0.0
    for op in ops:
        r = op.resources
        if r.num_cpus is not None:
            num_cpus = float(r.num_cpus)
        if r.num_gpus is not None:
            gpus = float(r.num_gpus)
        elif r.local_model and r.accelerator != "cpu" and (cluster_gpus > 0 or r.accelerator == "cuda"):
            gpus = float(r.gpus_per_model)
        else:
            gpus = 0.0
        num_gpus = max(num_gpus, gpus)
    return {"num_cpus": num_cpus, "num_gpus": num_gpus}


API_CALLS_PER_ACTOR = 2


def calls_per_actor(ops: Iterable[Operator], ray: Any) -> int:
    """Work items one actor runs at once: 2 when every engine is an API client, as the local executor does, so
    the next batch's requests start while the last of the current one are still out and the actor's
    connections do not idle at batch ends; 1 for local models (one model, one batch at a time) and on a Ray
    too old for concurrent calls in an actor pool."""
    if not all(op.resources.is_api for op in ops):
        return 1
    params = inspect.signature(ray.data.ActorPoolStrategy).parameters
    if not {"max_concurrent_calls_per_actor", "enable_true_multi_threading"} <= set(params):
        return 1
    return API_CALLS_PER_ACTOR


class TagActor:
    """A Ray Data actor: the operators, rebuilt once from their specs; one work item per call."""

    def __init__(self, specs: list, cache: str | None) -> None:
        self.worker: OpWorker | None = None
        self.init_error: BaseException | None = None
        try:
            self.worker = OpWorker(specs, cache)
        except Exception as e:  # reported with each item, as the same exception type, not as a dead actor
            self.init_error = portable(e)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        results = []
        for payload in batch.column("payload").to_pylist():
            if self.worker is None:
                result = WorkerResult(error=self.init_error)
            else:
                rows, base_dir = pickle.loads(payload)
                result = self.worker.run(rows, base_dir)
            results.append(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        return pa.table({"idx": batch.column("idx"), "result": pa.array(results, pa.large_binary())})


def _quiet_progress_bar_notice() -> None:
    """Ray Data warns once per process that its progress bars are off; vlmtag turned them off on purpose."""
    try:
        from ray.util.debug import log_once

        log_once("ray_data_progress_manager_disabled")  # the key Ray Data checks before that warning
    except Exception:
        pass


def _queue_source(work_queue: Any) -> Any:
    """A Ray Data datasource with one read task that yields a one-row block per item taken from `work_queue`
    (until None), so the dataset streams from the driver instead of being materialised first."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    known = inspect.signature(BlockMetadata).parameters
    metadata = BlockMetadata(**{k: None for k in ("num_rows", "size_bytes", "schema", "input_files", "exec_stats")
                                if k in known})

    def read() -> Iterable[Any]:
        import pyarrow as pa

        while True:
            message = work_queue.get()
            if message is None:
                return
            idx, payload = message
            yield pa.table({"idx": pa.array([idx], pa.int64()), "payload": pa.array([payload], pa.large_binary())})

    class QueueSource(Datasource):
        def estimate_inmemory_data_size(self) -> None:
            return None

        def get_read_tasks(self, parallelism: int, **kwargs: Any) -> list:
            return [ReadTask(read, metadata)]

    return QueueSource()


class RayExecutor(Executor):
    """A Ray Data actor pool. Building it fails at once, with one line, when Ray is not installed or the address
    cannot work."""

    builds_own_ops = True

    def __init__(self, address: str | None = "auto", np: int = 1, max_in_flight: int | None = None) -> None:
        import_ray()
        check_address(address)
        self.address, self.np, self.max_in_flight = address, np, max_in_flight

    def run(self, pipeline: Pipeline, items: Iterable[WorkItem], done: Done, *, cache_path: str | None = None) -> None:
        ray = import_ray()
        started = connect(ray, self.address)
        try:
            _RayRun(ray, pipeline, cache_path, self.np, self.max_in_flight).run(items, done)
        finally:
            if started:
                ray.shutdown()


class _RayRun:
    """One run's driver side: feeds items into Ray, puts results back in input order."""

    def __init__(self, ray: Any, pipeline: Pipeline, cache_path: str | None, np: int, max_in_flight: int | None) -> None:
        self.ray, self.pipeline, self.cache_path = ray, pipeline, cache_path
        self.pool = pool_size(pipeline, np)
        self.calls_per_actor = calls_per_actor(pipeline, ray)
        self.max_in_flight = max_in_flight or (self.calls_per_actor + 1) * self.pool
        self.max_waiting = 4 * self.max_in_flight
        self.resources = actor_resources(pipeline, ray.cluster_resources().get("GPU", 0))
        self.results: queue_module.Queue = queue_module.Queue()
        self.pending: collections.deque[tuple[int, WorkItem]] = collections.deque()
        self.arrived: dict[int, bytes] = {}
        self.sent = 0
        self.end_sent = False
        self.stream_ended = False

    # -- the Ray side ------------------------------------------------------------------------------------------

    def _dataset(self, work_queue: Any) -> Any:
        rd = self.ray.data
        read_params = inspect.signature(rd.read_datasource).parameters
        # The read task only waits on the queue: it must not take a CPU the actors need.
        read_args = {"num_cpus": 0} if "num_cpus" in read_params else {"ray_remote_args": {"num_cpus": 0}}
        ds = rd.read_datasource(_queue_source(work_queue), override_num_blocks=1, **read_args)
        log.info("Ray: %d actor(s), %s each", self.pool, self.resources)
        return ds.map_batches(
            TagActor,
            fn_constructor_args=(self.pipeline.specs, self.cache_path),
            batch_size=1,
            batch_format="pyarrow",
            compute=rd.ActorPoolStrategy(size=self.pool, **self._concurrent_calls()),
            **self.resources,
        )

    def _concurrent_calls(self) -> dict[str, Any]:
        if self.calls_per_actor == 1:
            return {}
        return {"max_concurrent_calls_per_actor": self.calls_per_actor, "enable_true_multi_threading": True}

    def _collect(self, ds: Any) -> None:
        """In a thread: results as they come out of Ray (in whatever order), into `self.results`."""
        try:
            # prefetch_batches=0: each result is handed over as soon as it exists. With prefetching (iter_rows
            # always prefetches one), Ray holds a finished block back until the next one arrives; when the held
            # one is the oldest result, which the driver waits for before it sends more, the pipeline stalls.
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                for idx, result in zip(batch.column("idx").to_pylist(), batch.column("result").to_pylist()):
                    self.results.put((int(idx), result))
        except BaseException as e:
            self.results.put(e)
        finally:
            self.results.put(_END)

    # -- the driver side ---------------------------------------------------------------------------------------

    def run(self, items: Iterable[WorkItem], done: Done) -> None:
        from ray.util.queue import Queue

        ctx = self.ray.data.DataContext.get_current()
        saved = (ctx.target_max_block_size, ctx.enable_progress_bars)
        data_log = logging.getLogger("ray.data")
        saved_level = data_log.level
        # Blocks of one item each, passed on at once: without this, the read task would hold items back
        # until a block of many MiB is full. vlmtag shows its own progress line.
        ctx.target_max_block_size, ctx.enable_progress_bars = 1, False
        _quiet_progress_bar_notice()
        data_log.setLevel(max(saved_level, logging.WARNING))
        work_queue = Queue(actor_options={"num_cpus": 0})
        collector = None
        try:
            collector = threading.Thread(target=self._collect, args=(self._dataset(work_queue),),
                                         name="vlmtag-ray-results", daemon=True)
            collector.start()
            try:
                self._feed_and_finish(iter(items), work_queue, done)
            except KeyboardInterrupt:
                self._drain(work_queue, done)
                raise
            self._wait_end()
        finally:
            ctx.target_max_block_size, ctx.enable_progress_bars = saved
            data_log.setLevel(saved_level)
            try:
                work_queue.shutdown(force=True)  # also ends the read task, and so the dataset, after an error
            except Exception:
                pass
            if collector is not None:
                collector.join(timeout=60)

    def _send(self, work_queue: Any, items: Any) -> None:
        """Keep up to `max_in_flight` items in Ray (and no more than `max_waiting` sent but not yet handed to
        `done`, so a slow item cannot make the reorder buffer grow without end); after the last one, the end
        marker."""
        while (not self.end_sent and len(self.pending) - len(self.arrived) < self.max_in_flight
               and len(self.pending) < self.max_waiting):
            item = next(items, None)
            if item is None:
                work_queue.put(None)
                self.end_sent = True
                return
            work_queue.put((self.sent, pickle.dumps((item.rows, item.base_dir), protocol=pickle.HIGHEST_PROTOCOL)))
            self.pending.append((self.sent, item))
            self.sent += 1

    def _receive(self) -> None:
        """Wait for the next message from the collector thread and record it."""
        message = self.results.get()
        if message is _END:
            self.stream_ended = True
        elif isinstance(message, BaseException):
            raise message
        elif self.pending and message[0] >= self.pending[0][0]:  # anything older was given up on (Ctrl-C)
            self.arrived[message[0]] = message[1]

    def _take_oldest(self) -> tuple[WorkItem, WorkerResult] | None:
        """The oldest pending item and its result when that has arrived, else None."""
        idx, item = self.pending[0]
        if idx not in self.arrived:
            return None
        self.pending.popleft()
        result: WorkerResult = pickle.loads(self.arrived.pop(idx))
        merge_stats(self.pipeline, result)
        return item, result

    def _wait_oldest(self, work_queue: Any, items: Any) -> tuple[WorkItem, WorkerResult] | None:
        """The oldest pending item and its result, once it has arrived; None when the stream ended without it.

        Sending goes on meanwhile: results come back in any order, and waiting for the oldest before sending
        more would leave actors idle behind one slow item.
        """
        taken = self._take_oldest()
        while taken is None:
            if self.stream_ended:
                return None
            self._receive()
            taken = self._take_oldest()
            if taken is None:
                self._send(work_queue, items)
        return taken

    def _feed_and_finish(self, items: Any, work_queue: Any, done: Done) -> None:
        while True:
            self._send(work_queue, items)
            if not self.pending:
                return
            taken = self._wait_oldest(work_queue, items)
            if taken is None:
                raise RuntimeError("the Ray pipeline stopped before every item was processed")
            item, result = taken
            if result.error is not None:
                raise result.error
            done(item, result.rows)

    def _drain(self, work_queue: Any, done: Done) -> None:
        """After Ctrl-C: send nothing more, finish what was sent (a failed item is left for the rerun)."""
        if not self.end_sent:
            work_queue.put(None)
            self.end_sent = True  # so `_send` sends nothing more
        while self.pending:
            try:
                taken = self._wait_oldest(work_queue, iter(()))
            except Exception:
                return
            if taken is None:
                return
            item, result = taken
            if result.error is None:
                done(item, result.rows)

    def _wait_end(self) -> None:
        while not self.stream_ended:
            self._receive()
