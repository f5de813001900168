"""One streaming pass over an export: counts over every row, a fixed-size sample of images for the gallery.

Memory stays bounded whatever the export's size: tag counts, the first failures (capped), a reservoir sample of
gallery entries, and each tagged image's tags as small integers (for co-occurrence among the top tags).
"""

from __future__ import annotations

import json
import os
import random
from array import array
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from vlmtag.prompts import clean_text
from vlmtag.rowkeys import INVALID_ROW_KEY, META_KEY, error_field
from vlmtag.stats import RunStats, reason_kind

_MAX_CAPTION = 300  # characters of a row's text shown under its images


@dataclass
class Entry:
    """One image of one row, as the gallery and the failures table show it."""

    row: int  # 1-based row number in the export
    position: int  # index in the row's `images`
    source: str | None  # the path or URL as written in the row (None for an image from a bytes column)
    raw: Any = None  # the bytes column's value for this image, when there is one
    tags: list[str] = field(default_factory=list)
    error: str | None = None
    untagged: bool = False  # the row has no tag field at all
    caption: str = ""


@dataclass
class ReportData:
    tag_field: str
    rows: int = 0
    rows_unreadable: int = 0  # lines that were not a JSON object
    rows_untagged: int = 0  # rows without the tag field (not processed)
    rows_without_images: int = 0
    images: int = 0
    tagged: int = 0
    tagged_empty: int = 0  # tagged, but the model gave no tags
    failed: int = 0
    tag_counts: Counter = field(default_factory=Counter)
    failure_reasons: Counter = field(default_factory=Counter)
    failures: list[Entry] = field(default_factory=list)  # the first `max_failures`
    gallery: list[Entry] = field(default_factory=list)  # sorted by (row, position)
    co_occurrence: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # top tag -> [(tag, n)]

    @property
    def failures_not_listed(self) -> int:
        return self.failed - len(self.failures)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays from some readers
        return list(value.tolist())
    return [value]


def _tag_list(value: Any) -> list[str]:
    """One image's tags as strings, whatever odd shape the export holds (never raises)."""
    out: list[str] = []
    for t in _as_list(value):
        if t is None:
            continue
        text = t if isinstance(t, str) else json.dumps(t, ensure_ascii=False, default=str)
        if text not in out:
            out.append(text)
    return out


def _caption(row: dict, text_key: str) -> str:
    """The row's text as the model saw it: without Data-Juicer's special tokens, whitespace collapsed."""
    return clean_text(row.get(text_key))[:_MAX_CAPTION]


def collect(
    rows: Iterable[dict],
    *,
    tag_field: str = "image_tags",
    image_key: str = "images",
    image_bytes_key: str = "image_bytes",
    text_key: str = "text",
    max_gallery: int = 200,
    max_failures: int = 500,
    top_tags: int = 30,
    co_occurrence_tags: int = 15,
    seed: int = 0,
) -> ReportData:
    """Aggregate `rows` (any iterable, read once) into what the report shows."""
    errors_key = error_field(tag_field)
    data = ReportData(tag_field=tag_field)
    rng = random.Random(seed)
    reservoir: list[Entry] = []
    seen = 0  # images offered to the reservoir
    tag_ids: dict[str, int] = {}
    flat = array("I")  # the tags of every tagged image, as ids, one image after another
    ends = array("Q")  # where each image's ids end in `flat`

    for n, row in enumerate(rows, 1):
        data.rows += 1
        if not isinstance(row, dict) or INVALID_ROW_KEY in row:
            data.rows_unreadable += 1
            continue
        meta = row.get(META_KEY)
        meta = meta if isinstance(meta, dict) else {}
        paths = _as_list(row.get(image_key))
        raws = _as_list(row.get(image_bytes_key))
        count = max(len(paths), len(raws))
        if count == 0:
            data.rows_without_images += 1
            continue
        has_field = tag_field in meta
        if not has_field:
            data.rows_untagged += 1
        tag_lists = _as_list(meta.get(tag_field))
        errors = _as_list(meta.get(errors_key))
        caption = _caption(row, text_key)
        for j in range(count):
            path = paths[j] if j < len(paths) else None
            raw = raws[j] if j < len(raws) else None
            error = errors[j] if j < len(errors) else None
            tags = _tag_list(tag_lists[j]) if j < len(tag_lists) else []
            if error is not None and not isinstance(error, str):
                error = json.dumps(error, ensure_ascii=False, default=str)
            entry = Entry(
                row=n,
                position=j,
                source=path if isinstance(path, str) and path else None,
                raw=raw,
                tags=tags if error is None else [],
                error=error,
                untagged=not has_field,
                caption=caption,
            )
            if entry.source is None and raw is None and path is not None:
                entry.source = str(path)
            data.images += 1
            if has_field and error is not None:
                data.failed += 1
                data.failure_reasons[reason_kind(error)] += 1
                if len(data.failures) < max_failures:
                    data.failures.append(replace(entry, raw=None))  # the table shows no image
            elif has_field:
                data.tagged += 1
                if not tags:
                    data.tagged_empty += 1
                data.tag_counts.update(tags)
                for t in tags:
                    flat.append(tag_ids.setdefault(t, len(tag_ids)))
                ends.append(len(flat))
            # Reservoir sampling (Algorithm R): every image has the same chance to be in the gallery.
            seen += 1
            if len(reservoir) < max_gallery:
                reservoir.append(entry)
            elif max_gallery > 0:
                k = rng.randrange(seen)
                if k < max_gallery:
                    reservoir[k] = entry

    data.gallery = sorted(reservoir, key=lambda e: (e.row, e.position))
    data.co_occurrence = _co_occurrence(data.tag_counts, tag_ids, flat, ends, co_occurrence_tags)
    return data


def _co_occurrence(counts: Counter, tag_ids: dict[str, int], flat: array, ends: array, top: int,
                   per_tag: int = 5) -> dict[str, list[tuple[str, int]]]:
    """For each of the `top` most frequent tags, the tags seen most often on the same image."""
    if top <= 0 or not counts:
        return {}
    names = {i: t for t, i in tag_ids.items()}
    top_ids = {tag_ids[t] for t, _ in counts.most_common(top)}
    pairs: dict[int, Counter] = {i: Counter() for i in top_ids}
    start = 0
    for end in ends:
        ids = flat[start:end]
        start = end
        hits = [i for i in ids if i in top_ids]
        if not hits or len(ids) < 2:
            continue
        for a in hits:
            c = pairs[a]
            for b in ids:
                if b != a:
                    c[b] += 1
    out = {}
    for t, _ in counts.most_common(top):
        c = pairs[tag_ids[t]]
        out[t] = [(names[b], k) for b, k in sorted(c.items(), key=lambda kv: (-kv[1], names[kv[0]]))[:per_tag]]
    return out


# ---------------------------------------------------------------------------------------------- reading


def stats_path(export_path: str) -> str:
    """Where the run wrote its stats: next to the export (a file or a folder of parts)."""
    return export_path.rstrip("/" + os.sep) + ".stats.json"


def load_stats(export_path: str) -> tuple[RunStats | None, str | None]:
    """The run's stats (or None) and a note for the report when there are none or they could not be read."""
    path = stats_path(export_path)
    if not os.path.exists(path):
        return None, f"no stats file next to the export (looked for {path})"
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"stats file {path} could not be read ({str(e)[:120]})"
    if not isinstance(doc, dict):
        return None, f"stats file {path} is not a JSON object"
    return RunStats.from_dict(doc), None
