"""Planning a run: which output each input shard goes to, where the job's state lives, the batches, and the
job's identity (what makes a rerun the same job)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

from vlmtag.errors import ConfigError
from vlmtag.io import Shard, UnsupportedFormat, format_of, open_dataset
from vlmtag.io.base import FORMATS, describe_unreadable
from vlmtag.ops.base import Pipeline
from vlmtag.rowkeys import INVALID_ROW_KEY

STATE_DIR = ".vlmtag"


@dataclass
class Plan:
    """Which output file each input shard goes to, and where the job keeps its state."""

    shards: list[Shard]
    outputs: list[str]  # one per shard; the same path for every shard when the export is one file
    export_path: str
    work_dir: str  # `<work_dir>/.vlmtag/` holds the jobs and the default answer cache

    @property
    def targets(self) -> list[tuple[str, list[int]]]:
        """(output path, indices of the shards written into it), in order."""
        order: dict[str, list[int]] = {}
        for i, out in enumerate(self.outputs):
            order.setdefault(out, []).append(i)
        return list(order.items())

    @property
    def state_root(self) -> str:
        return os.path.join(self.work_dir, STATE_DIR)

    @property
    def stats_path(self) -> str:
        return stats_path_for(self.export_path)

    def images_root(self) -> str | None:
        """The one folder relative image paths resolved against, or None when the shards differ."""
        roots = {s.base_dir for s in self.shards}
        return roots.pop() if len(roots) == 1 else None

    def parts(self) -> list[dict]:
        return [{"output": o, "shard": s.path, "images_root": s.base_dir} for o, s in zip(self.outputs, self.shards)]


def recipe_shards(dataset_path: str) -> list[Shard]:
    """The shards of a recipe's `dataset_path`; a path that is missing or of no known format is a recipe error."""
    try:
        return open_dataset(dataset_path)
    except (FileNotFoundError, UnsupportedFormat) as e:
        raise ConfigError(f"recipe: dataset_path: {e}") from None


def is_folder_export(export_path: str) -> bool:
    return export_path.endswith(("/", os.sep)) or os.path.isdir(export_path) or not os.path.splitext(export_path)[1]


def stats_path_for(export_path: str) -> str:
    return export_path.rstrip("/" + os.sep) + ".stats.json"


def plan(shards: list[Shard], export_path: str, *, export_type: str | None = None, work_dir: str | None = None) -> Plan:
    """One output per shard for a folder export (named after the shard), else every shard into one file.
    `work_dir` defaults to the export's folder, as in Data-Juicer."""
    if not is_folder_export(export_path):
        try:
            format_of(export_path)
        except UnsupportedFormat as e:
            raise ConfigError(f"export_path: {e}") from None
        outputs = [export_path] * len(shards)
    else:
        if export_type and f".{export_type}" not in FORMATS:
            raise ConfigError(f"export_type={export_type!r}: expected one of {', '.join(f[1:] for f in FORMATS)}")
        outputs, seen = [], set()
        for shard in shards:
            stem, ext = os.path.splitext(shard.name)
            name = stem + (f".{export_type}" if export_type else (ext if ext in FORMATS else ".jsonl"))
            if name in seen:
                raise ConfigError(f"export_path: two input shards would both write {name!r}; export to one file "
                                  "instead")
            seen.add(name)
            outputs.append(os.path.join(export_path, name))
        export_path = export_path.rstrip("/" + os.sep)
    work_dir = work_dir or os.path.dirname(os.path.abspath(export_path))
    return Plan(shards, outputs, export_path, work_dir)


def iter_batches(shards: list[Shard], batch_size: int, limit: int | None) -> Iterator[tuple[int, int, list[dict]]]:
    """(shard index, batch index, rows) over every shard, stopping after `limit` rows."""
    left = limit
    for s, shard in enumerate(shards):
        for b, rows in enumerate(shard.batches(batch_size)):
            if left is not None:
                if left <= 0:
                    return
                rows = rows[:left]
                left -= len(rows)
            yield s, b, rows


def count_unreadable(shards: list[Shard], batch_size: int, limit: int | None) -> tuple[int, str | None]:
    """Rows the run would keep as unreadable, and where the first one is (a read of the whole input, for
    `--strict`, before any request is sent)."""
    count, first = 0, None
    for s, _, rows in iter_batches(shards, batch_size, limit):
        for row in rows:
            if INVALID_ROW_KEY in row:
                count += 1
                first = first or describe_unreadable(row[INVALID_ROW_KEY], shards[s].name)
    return count, first


def job_identity(the_plan: Plan, pipeline: Pipeline, *, mode: str, limit: int | None) -> dict:
    """What makes a rerun the same job: the inputs (a changed file is a new job), the outputs, the operators'
    settings, the batching and the row limit."""
    return {
        "mode": mode,
        "shards": [_shard_identity(s) for s in the_plan.shards],
        "export": os.path.abspath(the_plan.export_path),
        "outputs": [os.path.abspath(o) for o in the_plan.outputs],
        "ops": pipeline.provenance(),
        "fingerprints": pipeline.fingerprints,
        "batch_size": pipeline.batch_size,
        "limit": limit,
    }


def _shard_identity(shard: Shard) -> dict:
    ident = {"path": os.path.abspath(shard.path) if shard.rows is None else shard.path, "kind": shard.kind}
    try:
        st = os.stat(shard.path)
        ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    except OSError:
        pass
    return ident
