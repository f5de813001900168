"""`vlmtag run --dry-run`: read the input, check that every image opens, estimate tokens and cost, send nothing.

Rows are gathered by the operator itself (the same skipped rows, images and prompts as a real run). Images are
opened far enough to read their size (the header), not decoded. URLs are not fetched (that would be traffic to
someone's server); they are counted at the full `max_pixels` budget. The estimate assumes every image is asked
once (the answer cache can only make a real run cheaper) and `EXPECTED_OUTPUT_TOKENS` per answer; the answer
budget (`engines.sampling.answer_budget`) gives the upper bound.
"""

from __future__ import annotations

import functools
import io
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable

from PIL import Image

from vlmtag.cost import text_tokens, visual_tokens
from vlmtag.engines.sampling import answer_budget
from vlmtag.images import FetchLimits, ImageError, read_source
from vlmtag.images.prepare import MAX_SOURCE_PIXELS, target_size
from vlmtag.ops.loader import BadEntry, Source
from vlmtag.stats import reason_kind

#: Output tokens of a typical answer: a JSON list of 5–10 tags is about 40–80 tokens. An estimate, not a bound.
EXPECTED_OUTPUT_TOKENS = 64


@dataclass
class DryRunReport:
    rows: int = 0
    rows_already_tagged: int = 0
    images: int = 0
    images_ok: int = 0
    urls_not_checked: int = 0
    bad_images: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason kind -> one full error message
    input_tokens: int = 0
    output_tokens: int = 0
    output_tokens_max: int = 0
    cost: float | None = None
    cost_max: float | None = None
    # the same through the Batch API: the online prices × `batch_price_discount`
    batch_cost: float | None = None
    batch_cost_max: float | None = None
    batch_discount: float | None = None  # None when the taggers' discounts differ

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["bad_images"] = dict(self.bad_images.most_common())
        return d

    def add(self, other: "DryRunReport") -> None:
        """Add another tagger's estimate over the same rows: rows once, images and tokens once per tagger (as
        the run counts them)."""
        self.rows_already_tagged = max(self.rows_already_tagged, other.rows_already_tagged)
        for name in ("images", "images_ok", "urls_not_checked", "input_tokens", "output_tokens", "output_tokens_max"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.bad_images.update(other.bad_images)
        self.examples = {**other.examples, **self.examples}
        if self.batch_discount != other.batch_discount:
            self.batch_discount = None
        for name in ("cost", "cost_max", "batch_cost", "batch_cost_max"):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, None if mine is None and theirs is None else (mine or 0.0) + (theirs or 0.0))


def _image_size(source: Source, base_dir: str | None, limits: FetchLimits) -> tuple[int, int] | str | None:
    """(width, height) as the model would see it, an error message, or None for a URL that is not fetched."""
    if isinstance(source, BadEntry):
        return source.error
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        return None
    try:
        raw = source if isinstance(source, bytes) else read_source(source, base_dir=base_dir, limits=limits)
        with Image.open(io.BytesIO(raw)) as im:  # lazy: reads the header, decodes nothing
            width, height = im.size
            orientation = im.getexif().get(0x0112, 1)
    except ImageError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for a non-image
        return f"not an image ({type(e).__name__}: {e})"[:200]
    if width * height > MAX_SOURCE_PIXELS:
        return f"image too large: {width}x{height} pixels (decompression bomb?)"
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def dry_run(op, batches: Iterable[tuple[list[dict], str | None]], *, workers: int = 16) -> DryRunReport:
    """Walk (rows, base_dir) batches the way `op` would, without an engine."""
    o = op.options
    report = DryRunReport()
    side = int(o.max_pixels**0.5)  # a URL's size is unknown: count the whole max_pixels budget
    with ThreadPoolExecutor(workers) as pool:
        for rows, base_dir in batches:
            gathered = op.gather_rows(rows, base_dir)
            report.rows += len(rows)
            report.rows_already_tagged += gathered.skipped
            size_of = functools.partial(_image_size, base_dir=base_dir, limits=op.loader.limits)
            sizes = list(pool.map(size_of, gathered.sources))
            for _, _, r in gathered.slots:  # every image of every row, duplicates included
                img, prompt = gathered.requests[r]
                size = sizes[img]
                report.images += 1
                if isinstance(size, str):
                    kind = reason_kind(size)
                    report.bad_images[kind] += 1
                    report.examples.setdefault(kind, size)
                    continue
                if size is None:
                    report.urls_not_checked += 1
                    w, h = side, side
                else:
                    report.images_ok += 1
                    w, h = target_size(size[0], size[1], o.max_pixels)
                report.input_tokens += visual_tokens(w, h) + text_tokens(op.system_prompt + prompt)
    asked = report.images_ok + report.urls_not_checked
    report.output_tokens = asked * EXPECTED_OUTPUT_TOKENS
    report.output_tokens_max = asked * answer_budget(o.sampling_params)
    if op.pricing.known:
        report.cost = op.pricing.cost(report.input_tokens, report.output_tokens)
        report.cost_max = op.pricing.cost(report.input_tokens, report.output_tokens_max)
        report.batch_discount = o.batch_price_discount
        report.batch_cost = report.cost * o.batch_price_discount
        report.batch_cost_max = report.cost_max * o.batch_price_discount
    return report


def dry_run_recipe(recipe, *, limit: int | None = None) -> DryRunReport:
    """The dry run of every tagger of a recipe over its dataset, added up (no engine is built, no request is
    sent)."""
    from vlmtag.config import build_ops
    from vlmtag.run.plan import iter_batches, recipe_shards

    total: DryRunReport | None = None
    ops = build_ops(recipe)
    shards = recipe_shards(recipe.dataset_path)
    for op in ops:
        batches = ((rows, shards[s].base_dir) for s, _, rows in iter_batches(shards, op.batch_size, limit))
        report = dry_run(op, batches)
        if total is None:
            total = report
        else:
            total.add(report)
    assert total is not None, "a recipe has at least one operator"
    return total
