"""The HTML report of an export: run stats, a tag chart, a gallery filterable by tag and the failures.

What it owns: reading an export and its `<export>.stats.json` (through `vlmtag.stats.RunStats`, the one schema
of that file, which the run writes) and turning them into one self-contained page.

- `collect.py` reads the export once (streamed) and aggregates it; `load_stats` reads the run's stats.
- `thumbnails.py` makes the gallery's small JPEGs (data: URLs).
- `html.py` computes what the page shows and renders it with Jinja2 (autoescape on, imported only when a page is
  rendered) from package data: `templates/report.html.j2`, `static/report.css`, `static/report.js`.

What it must not import: the run and the machinery that tags (`vlmtag.run`, `vlmtag.executors`, `vlmtag.ops`,
`vlmtag.engines`). A report reads what a run wrote; it never runs, plans or configures one, so it works on any
export, stays quick to import, and the run can change without breaking it. It may use the shared, light modules:
`vlmtag.stats`, `vlmtag.rowkeys`, `vlmtag.prompts`, `vlmtag.io` (reading exports, paths), `vlmtag.images`
(loading an image for a thumbnail) and `vlmtag.errors`.
"""

from __future__ import annotations

from vlmtag.lazy import lazy_exports

# The page's limits, here so that `vlmtag report --help` needs nothing heavy.
DEFAULT_MAX_GALLERY = 200
DEFAULT_MAX_FAILURES = 500
DEFAULT_TOP_TAGS = 30

_EXPORTS = {
    "iter_export_rows": "vlmtag.io.exports",
    "ReportData": "vlmtag.report.collect", "collect": "vlmtag.report.collect", "load_stats": "vlmtag.report.collect",
    "ReportResult": "vlmtag.report.html", "build_report": "vlmtag.report.html",
    "default_report_path": "vlmtag.report.html", "render": "vlmtag.report.html", "write_report": "vlmtag.report.html",
}

# Thumbnails need OpenCV and an HTTP client: load them when a report is made, not when the CLI starts.
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "DEFAULT_MAX_FAILURES",
    "DEFAULT_MAX_GALLERY",
    "DEFAULT_TOP_TAGS",
    "ReportData",
    "ReportResult",
    "build_report",
    "collect",
    "default_report_path",
    "iter_export_rows",
    "load_stats",
    "render",
    "write_report",
]
