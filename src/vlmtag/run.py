"""A tagging run: read the dataset, run the operators on an executor, write the export and its stats."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

from vlmtag import __version__
from vlmtag.config import Recipe, build_ops
from vlmtag.errors import ConfigError
from vlmtag.executors import run_local
from vlmtag.io import UnsupportedFormat, format_of, open_writer, read_batches
from vlmtag.ops import RunAborted


@dataclass
class RunResult:
    export_path: str
    stats_path: str
    rows_written: int
    wall_seconds: float
    stats: dict
    aborted: str | None = None
    partial_path: str | None = None
    provenance: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.stats.get("images", 0) / self.wall_seconds if self.wall_seconds > 0 else 0.0


def _limited(batches: Iterable[list[dict]], limit: int | None) -> Iterator[list[dict]]:
    if limit is None:
        yield from batches
        return
    left = limit
    for batch in batches:
        if left <= 0:
            return
        yield batch[:left]
        left -= len(batch)


def partial_path_for(export_path: str) -> str:
    stem, ext = os.path.splitext(export_path)
    return f"{stem}.partial{ext}"


def stats_path_for(export_path: str) -> str:
    return export_path + ".stats.json"


def provenance(ops: Sequence) -> dict:
    """What produced the tags (never any client settings such as API keys)."""
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
            }
        )
    return {"vlmtag_version": __version__, "ops": info}


def run_ops(
    ops: Sequence,
    batches: Iterable[list[dict]],
    export_path: str,
    *,
    base_dir: str | None,
    dataset: str,
    limit: int | None = None,
) -> RunResult:
    """Run `ops` over `batches` into `export_path`; on an aborted run, keep finished rows in a `.partial` file."""
    try:
        format_of(export_path)
    except UnsupportedFormat as e:
        raise ConfigError(f"export_path: {e}") from None
    for op in ops:
        op.setup()
    start = time.perf_counter()
    writer = open_writer(export_path)
    aborted = partial = None
    try:
        run_local(ops, _limited(batches, limit), writer.write, base_dir=base_dir)
    except (RunAborted, KeyboardInterrupt) as e:
        aborted = str(e) or "interrupted"
        partial = partial_path_for(export_path)
        writer.commit(partial)
    except BaseException:
        writer.abort()
        raise
    else:
        writer.commit()
    finally:
        for op in ops:
            op.close()
    wall = time.perf_counter() - start
    stats = _merged_stats(ops)
    result = RunResult(
        export_path=export_path,
        stats_path=stats_path_for(export_path),
        rows_written=writer.rows_written,
        wall_seconds=wall,
        stats=stats,
        aborted=aborted,
        partial_path=partial,
        provenance=provenance(ops),
    )
    _write_stats(result, dataset=dataset, base_dir=base_dir)
    return result


def _merged_stats(ops: Sequence) -> dict:
    # The first op's counters describe the run (recipes hold one tagger; more would tag different fields).
    return ops[0].stats.as_dict() if ops else {}


def _write_stats(result: RunResult, *, dataset: str, base_dir: str | None) -> None:
    doc = {
        "export_path": result.export_path if not result.aborted else result.partial_path,
        "dataset_path": dataset,
        "images_root": base_dir,
        "completed": result.aborted is None,
        "aborted": result.aborted,
        "rows_written": result.rows_written,
        **result.stats,
        "wall_seconds": round(result.wall_seconds, 3),
        "images_per_second": round(result.images_per_second, 3),
        "provenance": result.provenance,
    }
    tmp = result.stats_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, result.stats_path)


def run_recipe(recipe: Recipe, *, limit: int | None = None) -> RunResult:
    ops = build_ops(recipe)
    if not os.path.exists(recipe.dataset_path):
        raise ConfigError(f"recipe: dataset_path={recipe.dataset_path!r}: no such file")
    try:
        format_of(recipe.dataset_path)
    except UnsupportedFormat as e:
        raise ConfigError(f"recipe: dataset_path: {e}") from None
    batch_size = ops[0].options.batch_size
    base_dir = os.path.dirname(os.path.abspath(recipe.dataset_path))
    return run_ops(
        ops,
        read_batches(recipe.dataset_path, batch_size),
        recipe.export_path,
        base_dir=base_dir,
        dataset=recipe.dataset_path,
        limit=limit,
    )


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def image_rows(paths: Sequence[str]) -> Iterator[dict]:
    """One row per image file; folders are walked recursively (sorted), keeping only image extensions."""
    for path in paths:
        if "://" in path or os.path.isfile(path):
            yield {"images": [path]}
        elif os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                        yield {"images": [os.path.join(root, name)]}
        else:
            raise ConfigError(f"{path}: no such file or folder")


def batched(rows: Iterable[dict], n: int) -> Iterator[list[dict]]:
    it = iter(rows)
    while batch := list(itertools.islice(it, n)):
        yield batch
