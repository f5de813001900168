"""`vlmtag report EXPORT [-o report.html]`: one self-contained HTML page to look at what a run produced."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from vlmtag.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console


def add_parser(sub) -> None:
    from vlmtag.report import DEFAULT_MAX_GALLERY, DEFAULT_TOP_TAGS

    p = sub.add_parser("report", help="write an HTML report (stats, tag chart, gallery, failures) of an export")
    p.add_argument("export", metavar="EXPORT", help="an export written by vlmtag (.jsonl, .json or .parquet)")
    p.add_argument("-o", "--output", metavar="HTML", help="report file (default: EXPORT.report.html)")
    p.add_argument("--images-root", metavar="DIR",
                   help="folder that relative image paths resolve against (default: the one the run recorded)")
    p.add_argument("--max-gallery", type=int, default=DEFAULT_MAX_GALLERY, metavar="N",
                   help=f"images in the gallery, sampled at random from all (default {DEFAULT_MAX_GALLERY})")
    p.add_argument("--field", metavar="NAME", help="tag field (default: the run's tag_field_name, else image_tags)")
    p.add_argument("--top-tags", type=int, default=DEFAULT_TOP_TAGS, metavar="N",
                   help=f"tags in the frequency chart (default {DEFAULT_TOP_TAGS})")
    p.add_argument("--fetch-urls", action="store_true",
                   help="download http(s) images for their thumbnails (default: show the URL only)")


def run(args: argparse.Namespace, console: Console) -> int:
    from vlmtag.errors import EXIT_OK
    from vlmtag.report import write_report

    if args.max_gallery < 0:
        raise ConfigError(f"--max-gallery={args.max_gallery}: expected a number ≥ 0")
    if args.top_tags < 0:
        raise ConfigError(f"--top-tags={args.top_tags}: expected a number ≥ 0")
    if args.images_root is not None and not os.path.isdir(args.images_root):
        raise ConfigError(f"--images-root={args.images_root!r}: no such folder")
    result = write_report(
        args.export,
        args.output,
        args.images_root,
        max_gallery=args.max_gallery,
        tag_field=args.field,
        top_tags=args.top_tags,
        fetch_urls=args.fetch_urls,
    )
    d = result.data
    console.print(
        f"report: {result.path} ({d.rows:,} rows, {d.images:,} images, {d.tagged:,} tagged, {d.failed:,} failed; "
        f"{len(d.gallery):,} in the gallery; {result.bytes_written / 1e6:.1f} MB)",
        markup=False, highlight=False,
    )
    return EXIT_OK
