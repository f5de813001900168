"""`vlmtag run --dry-run`: read the input, check that every image opens, estimate tokens and cost, send nothing.

Images are opened far enough to read their size (the header), not decoded. URLs are not fetched (that would
be traffic to someone's server); they are counted at the full `max_pixels` budget. The estimate assumes every image is asked once (the answer
cache can only make a real run cheaper) and `expected_output_tokens` per answer (a 5–10 tag JSON answer is
about 40–80 tokens); `max_tokens` gives the upper bound.
"""

from __future__ import annotations

import io
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

from PIL import Image

from vlmtag.cost import text_tokens, visual_tokens
from vlmtag.images import ImageError, read_source
from vlmtag.images.prepare import MAX_SOURCE_PIXELS, target_size
from vlmtag.prompts import clean_text, fill_template
from vlmtag.rowkeys import BYTES_KEY, META_KEY
from vlmtag.stats import reason_kind

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

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["bad_images"] = dict(self.bad_images.most_common())
        return d


def _image_size(source: Any, base_dir: str | None) -> tuple[int, int] | str | None:
    """(width, height), an error message, or None for a URL that is not fetched."""
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        return None
    try:
        raw = source if isinstance(source, bytes) else read_source(source, base_dir=base_dir)
        with Image.open(io.BytesIO(raw)) as im:
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
    max_out = int(o.sampling_params.get("max_tokens") or o.sampling_params.get("max_new_tokens") or 512)
    tokens = (o.image_special_token, o.eoc_special_token)
    with ThreadPoolExecutor(workers) as pool:
        for rows, base_dir in batches:
            jobs: list[tuple[Any, str]] = []
            for row in rows:
                report.rows += 1
                meta = row.get(META_KEY)
                if isinstance(meta, dict) and op.tag_field_name in meta and not o.overwrite:
                    report.rows_already_tagged += 1
                    continue
                images = row.get(o.image_key if o.image_key in row or BYTES_KEY not in row else "images")
                images = images if isinstance(images, list) else ([] if images is None else [images])
                attached = row.get(o.image_bytes_key) or row.get(BYTES_KEY) or []
                prompt = op.system_prompt + fill_template(op.input_template, clean_text(row.get(o.text_key), tokens))
                for j, path in enumerate(images):
                    raw = attached[j] if isinstance(attached, list) and j < len(attached) else None
                    if isinstance(raw, dict):
                        raw = raw.get("bytes")
                    jobs.append((raw if isinstance(raw, (bytes, bytearray)) else path, prompt))
            sizes = pool.map(lambda job: _image_size(bytes(job[0]) if isinstance(job[0], bytearray) else job[0],
                                                     base_dir), jobs)
            for (_, prompt), size in zip(jobs, sizes):
                report.images += 1
                if size is None:  # size unknown: count the whole max_pixels budget
                    report.urls_not_checked += 1
                    side = int(o.max_pixels ** 0.5)
                    report.input_tokens += visual_tokens(side, side) + text_tokens(prompt)
                    continue
                if isinstance(size, str):
                    kind = reason_kind(size)
                    report.bad_images[kind] += 1
                    report.examples.setdefault(kind, size)
                    continue
                report.images_ok += 1
                w, h = target_size(size[0], size[1], o.max_pixels)
                report.input_tokens += visual_tokens(w, h) + text_tokens(prompt)
    asked = report.images_ok + report.urls_not_checked
    report.output_tokens = asked * EXPECTED_OUTPUT_TOKENS
    report.output_tokens_max = asked * max_out
    if op.pricing.known:
        report.cost = op.pricing.cost(report.input_tokens, report.output_tokens)
        report.cost_max = op.pricing.cost(report.input_tokens, report.output_tokens_max)
    return report


def dry_run_recipe(recipe, *, limit: int | None = None) -> DryRunReport:
    """The dry run of a recipe's first tagger over its dataset (no engine is built, no request is sent)."""
    from vlmtag.config import build_ops
    from vlmtag.errors import ConfigError
    from vlmtag.io import UnsupportedFormat, open_dataset
    from vlmtag.run import iter_batches

    op = build_ops(recipe)[0]
    try:
        shards = open_dataset(recipe.dataset_path)
    except (FileNotFoundError, UnsupportedFormat) as e:
        raise ConfigError(f"recipe: dataset_path: {e}") from None
    batches = ((rows, shards[s].base_dir) for s, _, rows in iter_batches(shards, op.options.batch_size, limit))
    return dry_run(op, batches)
