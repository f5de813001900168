"""`--retry-failed`: an existing export becomes the input, and its rows with a failed image lose their tag
fields, so the operator tags them again (the images of those rows that had tags come back from the cache)."""

from __future__ import annotations

import os
from typing import Iterable

from vlmtag.errors import ConfigError
from vlmtag.io import Shard, open_dataset
from vlmtag.rowkeys import META_KEY, error_field
from vlmtag.run.execute import RowFilter
from vlmtag.run.plan import stats_path_for
from vlmtag.stats import RunStats


def without_failures(tag_fields: Iterable[str]) -> RowFilter:
    fields = [(tag_field, error_field(tag_field)) for tag_field in tag_fields]

    def prepare(rows: list[dict]) -> list[dict]:
        for row in rows:
            meta = row.get(META_KEY)
            if not isinstance(meta, dict):
                continue
            for tag_field, errors_field in fields:
                if any(meta.get(errors_field) or []):
                    meta = {k: v for k, v in meta.items() if k not in (tag_field, errors_field)}
            row[META_KEY] = meta
        return rows

    return prepare


def retry_shards(export_path: str) -> list[Shard]:
    """The existing export's parts as input, each with the folder its images resolve against."""
    stats_file = stats_path_for(export_path)
    if not os.path.exists(stats_file):
        raise ConfigError(f"--retry-failed: no finished export at {export_path} (missing {stats_file})")
    stats = RunStats.read(stats_file)
    roots = {os.path.abspath(p["output"]): p["images_root"] for p in stats.parts}
    shards = []
    for shard in open_dataset(export_path):
        root = roots.get(os.path.abspath(shard.path), stats.images_root or shard.base_dir)
        shards.append(Shard(shard.path, shard.kind, root))
    return shards
