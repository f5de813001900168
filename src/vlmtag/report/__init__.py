"""The HTML report of an export: run stats, a tag chart, a gallery filterable by tag and the failures.

`collect.py` reads the export once and aggregates it, `thumbnails.py` makes the gallery's small JPEGs,
`html.py` writes the single self-contained page.
"""

from vlmtag.io.exports import iter_export_rows
from vlmtag.report.collect import ReportData, collect, load_stats
from vlmtag.report.html import ReportResult, build_report, default_report_path, render, write_report

__all__ = [
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
