"""Batch mode: a job's requests through an OpenAI-compatible Batch API (half the online price), resumable across
days; or written as request files for `vllm run-batch` and their results ingested.

- `client.py`: the Batch API (files, batches) over HTTP.
- `requests.py`: request lines (`custom_id` = the operator's cache key, `body` = the online request) and files.
- `state.py`: the job's batch checkpoint, `<work_dir>/.vlmtag/jobs/<id>/batch/`.
- `results.py`: result lines read back into outcomes.
- `runner.py`: the batch phase: walk, submit, poll, ingest, follow-up batches.
- `job.py`: the job: the batch phase, then the export by `vlmtag.run.run_job` through the answer cache; status,
  cancel, export and ingest.

This layer sits above `vlmtag.run` (it uses run, ops, io, cache and jobs); nothing below may import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmtag.lazy import lazy_exports

if TYPE_CHECKING:
    from vlmtag.batch.job import (
        BatchJob,
        cancel,
        export_requests,
        finish_ingested,
        ingest,
        open_batch_job,
        open_recipe_job,
        run_batch,
        run_batch_job,
        run_batch_recipe,
        status,
    )
    from vlmtag.batch.runner import BatchProgress

__all__ = ["BatchJob", "BatchProgress", "cancel", "export_requests", "finish_ingested", "ingest", "open_batch_job",
           "open_recipe_job", "run_batch", "run_batch_job", "run_batch_recipe", "status"]

__getattr__, __dir__ = lazy_exports(__name__, {
    **{name: "vlmtag.batch.job" for name in __all__ if name != "BatchProgress"},
    "BatchProgress": "vlmtag.batch.runner",
})
