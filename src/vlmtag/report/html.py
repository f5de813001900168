"""The HTML report: one self-contained static file (inline CSS and JS, thumbnails as data: URLs, no network).

The page is `templates/report.html.j2`, with `static/report.css` and `static/report.js` inlined, rendered by
Jinja2 with autoescape on: every value the template prints is escaped (html.escape, quotes too) unless it is
markup the template itself built. Text from a dataset or a model (tags, errors, paths, captions, stats values)
reaches the template only as plain strings, so it is always escaped; the filter script reads tags only from
escaped `data-` attributes and writes only with `textContent`. A Content-Security-Policy allows nothing but the
page's own script (by the sha256 of its exact text), inline styles and data: images, so even a slip in escaping
could run no injected script and fetch nothing.

This module computes what the page shows (plain values, no markup); the template lays it out.
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import hashlib
import html
import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Iterable

from vlmtag import __version__
from vlmtag.errors import ConfigError
from vlmtag.io.exports import iter_export_rows
from vlmtag.atomic import atomic_path
from vlmtag.report import DEFAULT_MAX_FAILURES, DEFAULT_MAX_GALLERY, DEFAULT_TOP_TAGS
from vlmtag.urls import is_remote
from vlmtag.report.collect import Entry, ReportData, collect, load_stats
from vlmtag.report.thumbnails import Thumbnail, make_thumbnails
from vlmtag.stats import RunStats

if TYPE_CHECKING:
    import jinja2

CO_OCCURRENCE_TAGS = 15
_MAX_SHOWN = 300  # characters of a path, URL or reason shown in the page
TEMPLATE = "report.html.j2"


def _short(text: object, limit: int = _MAX_SHOWN) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shown_source(source: str | None) -> str:
    if source is None:
        return "(image bytes)"
    if source[:5].lower() == "data:":
        return f"data: URI ({len(source):,} characters)"
    return _short(source)


def _num(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _compact(n: int | None) -> str:
    if n is None:
        return "—"
    for size, unit, start in ((1e9, "B", 999_950_000), (1e6, "M", 999_950), (1e3, "k", 10_000)):
        if n >= start:
            return f"{n / size:,.1f}{unit}".replace(".0" + unit, unit)
    return f"{n:,}"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "—"


def _duration(seconds: object) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "—"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def _op_info(stats: RunStats | None, tag_field: str) -> dict:
    """The provenance of the operator that wrote `tag_field` (else the first one), as the run recorded it."""
    prov = stats.provenance if stats is not None else {}
    ops = prov.get("ops")
    ops = [o for o in ops if isinstance(o, dict)] if isinstance(ops, list) else []
    for op in ops:
        if op.get("tag_field_name") == tag_field:
            return op
    return ops[0] if ops else {}


def default_tag_field(stats: RunStats | None) -> str:
    name = _op_info(stats, "").get("tag_field_name")
    return name if isinstance(name, str) and name else "image_tags"


# ---------------------------------------------------------------------------------------------- what the page shows
# Plain values only: the template escapes every one of them.


def _card(label: str, value: str, sub: str = "", cls: str = "") -> dict:
    return {"label": label, "value": value, "sub": sub, "cls": cls}


def _header(data: ReportData, stats: RunStats | None, export_name: str, images_root: str | None,
            notes: list[str]) -> dict:
    op = _op_info(stats, data.tag_field)
    if stats is not None:
        s = stats
        rows, images, tagged, failed = s.rows, s.images, s.tagged, s.failed
        retries, requests, pin, pout = s.retries, s.requests, s.prompt_tokens, s.completion_tokens
        wall, ips = _duration(s.wall_seconds), f"{s.images_per_second:,.2f}"
        already = f"{s.rows_already_tagged:,} already tagged" if s.rows_already_tagged else ""
    else:  # the export's own counts; what only the run knew is unknown
        rows, images, tagged, failed = data.rows, data.images, data.tagged, data.failed
        retries = requests = pin = pout = None
        wall = ips = "—"
        already = ""
    cards = [
        _card("Rows", _num(rows), already),
        _card("Images", _num(images)),
        _card("Tagged", _num(tagged), _pct(tagged, images) if images else "", "ok"),
        _card("Failed", _num(failed), _pct(failed, images) if images else "", "bad" if failed else ""),
        _card("Retries", _num(retries), f"{_num(requests)} requests" if requests is not None else ""),
        _card("Tokens in", _compact(pin), _num(pin) if pin is not None and pin >= 10_000 else ""),
        _card("Tokens out", _compact(pout), _num(pout) if pout is not None and pout >= 10_000 else ""),
        _card("Wall time", wall),
        _card("Images / s", ips),
    ]
    prov = stats.provenance if stats is not None else {}
    run = [
        ("model", op.get("model")),
        ("engine", op.get("engine")),
        ("tag field", data.tag_field),
        ("prompt sha256", op.get("prompt_sha256")),
        ("sampling", json.dumps(op["sampling_params"], sort_keys=True) if op.get("sampling_params") else None),
        ("vlmtag", prov.get("vlmtag_version")),
    ]
    where = [
        ("export", export_name),
        ("dataset", stats.dataset_path if stats is not None else None),
        ("images root", images_root),
    ]
    export_line = " · ".join(
        [f"This export: {_count(data.rows, 'row')}", _count(data.images, "image"), f"{data.tagged:,} tagged",
         f"{data.failed:,} failed"]
        + ([f"{_count(data.rows_untagged, 'row')} without the tag field"] if data.rows_untagged else [])
        + ([f"{_count(data.rows_without_images, 'row')} without images"] if data.rows_without_images else [])
        + ([f"{_count(data.rows_unreadable, 'unreadable line')}"] if data.rows_unreadable else [])
    )
    all_stats = []
    if stats is not None:
        all_stats = [(k, _short(json.dumps(v, ensure_ascii=False, default=str), 2000))
                     for k, v in stats.to_dict().items()]
    return {
        "have_stats": stats is not None,
        "cards": cards,
        "run": [(k, str(v)) for k, v in run if v not in (None, "")],
        "where": [(k, str(v)) for k, v in where if v not in (None, "")],
        "export_line": export_line,
        "notes": notes,
        "all_stats": all_stats,
    }


def _tags(data: ReportData, top: int) -> dict:
    common = data.tag_counts.most_common(top) if top > 0 else []
    if not common:
        return {"bars": []}
    biggest = common[0][1]
    bars = [{"tag": tag, "n": n, "width": f"{100.0 * n / biggest:.1f}", "pct": _pct(n, data.tagged)}
            for tag, n in common]
    total = sum(data.tag_counts.values())
    summary = (f"{len(data.tag_counts):,} distinct tags, {total:,} tags on {data.tagged:,} tagged images"
               f" ({total / data.tagged:.1f} per image)" if data.tagged else "")
    if data.tagged_empty:
        summary += f"; {data.tagged_empty:,} images got no tags"
    co = [{"tag": tag, "n": data.tag_counts[tag], "partners": partners}
          for tag, partners in data.co_occurrence.items()]
    return {"bars": bars, "summary": summary, "co": co}


def _gallery_item(entry: Entry, thumb: Thumbnail) -> dict:
    status = "untagged" if entry.untagged else ("failed" if entry.error is not None else "ok")
    shown = _shown_source(entry.source)
    # A URL or a data: URI is shown whole (its last part alone says little); a file by its name.
    whole = entry.source is None or is_remote(shown) or shown.startswith("data:")
    return {
        "status": status,
        "tags": entry.tags,
        "thumb": thumb,
        "shown": shown,
        "name": shown if whole else os.path.basename(shown) or shown,
        "where": f"row {entry.row:,}" + (f" · image {entry.position + 1}" if entry.position else ""),
        "error": entry.error or "",
        "caption": entry.caption,
    }


def _gallery(data: ReportData, thumbs: list[Thumbnail]) -> dict:
    n = len(data.gallery)
    if n == data.images:
        what = f"All {n:,} images."
    else:
        what = f"A random sample of {n:,} of {data.images:,} images (counts and the chart cover all of them)."
    return {"what": what, "entries": [_gallery_item(e, t) for e, t in zip(data.gallery, thumbs)]}


def _failures(data: ReportData) -> dict:
    return {
        "failed": data.failed,
        "reasons": [(r, n, _pct(n, data.failed)) for r, n in data.failure_reasons.most_common(20)],
        "rows": [(e.row, _shown_source(e.source), e.error or "") for e in data.failures],
        "not_listed": data.failures_not_listed,
    }


# ---------------------------------------------------------------------------------------------- template and assets


@functools.lru_cache(maxsize=1)
def _environment() -> "jinja2.Environment":
    import jinja2  # here, so `import vlmtag.report` stays light
    from markupsafe import Markup

    def escape(value: Any) -> Markup:
        """Every printed value as html.escape (quotes too) writes it; markup the template built stays as it is.

        Autoescape alone escapes too, with MarkupSafe's `&#34;` / `&#39;` for quotes; as Jinja2's `finalize`, this
        runs first and keeps the entities `html.escape` writes (and the page's text as it always was)."""
        return value if isinstance(value, Markup) else Markup(html.escape(str(value), quote=True))

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("vlmtag.report", "templates"),
        autoescape=True,
        finalize=escape,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["short"] = _short
    env.filters["num"] = _num
    env.filters["json"] = lambda v: json.dumps(v, ensure_ascii=False)
    return env


@dataclass(frozen=True)
class _Assets:
    css: str
    script: str
    csp: str


def _static(name: str) -> str:
    return resources.files("vlmtag.report").joinpath("static", name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _assets() -> _Assets:
    script = _static("report.js")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'; "
           "base-uri 'none'; form-action 'none'")
    return _Assets(css=_static("report.css"), script=script, csp=csp)


def content_security_policy() -> str:
    """The page's policy: no network, inline styles, data: images, and only its own script (by hash)."""
    return _assets().csp


# ---------------------------------------------------------------------------------------------- assembling


def render(data: ReportData, stats: RunStats | None, thumbs: list[Thumbnail], *, export_name: str = "",
           images_root: str | None = None, top_tags: int = DEFAULT_TOP_TAGS, notes: Iterable[str] = ()) -> str:
    """The page for already aggregated data (no I/O but reading the package's template and assets)."""
    notes = list(notes)
    if stats is not None and (stats.images, stats.tagged, stats.failed) != (data.images, data.tagged, data.failed):
        notes.append(
            "The export's counts differ from the run's stats (rows that were already tagged before the run, "
            "or an export edited since, are counted here but not in the run)."
        )
    with_images = data.rows - data.rows_unreadable - data.rows_without_images
    if with_images and data.rows_untagged == with_images:
        notes.append(f"No row has the tag field {data.tag_field!r}; pick the right one with --field.")
    assets = _assets()
    return _environment().get_template(TEMPLATE).render(
        title=f"vlmtag report — {export_name}" if export_name else "vlmtag report",
        version=__version__,
        now=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        csp=assets.csp,
        css=assets.css,
        script=assets.script,
        head=_header(data, stats, export_name, images_root, notes),
        tags=_tags(data, top_tags),
        gallery=_gallery(data, thumbs),
        failures=_failures(data),
    )


def build_report(
    rows: Iterable[dict],
    stats: RunStats | None,
    *,
    images_root: str | None = None,
    tag_field: str | None = None,
    max_gallery: int = DEFAULT_MAX_GALLERY,
    max_failures: int = DEFAULT_MAX_FAILURES,
    top_tags: int = DEFAULT_TOP_TAGS,
    fetch_urls: bool = False,
    export_name: str = "",
    notes: Iterable[str] = (),
) -> tuple[str, ReportData]:
    """Aggregate `rows` (read once, streamed), make the gallery's thumbnails and return the page and its data."""
    field = tag_field or default_tag_field(stats)
    data = collect(rows, tag_field=field, max_gallery=max_gallery, max_failures=max_failures, top_tags=top_tags,
                   co_occurrence_tags=min(CO_OCCURRENCE_TAGS, top_tags))
    thumbs = make_thumbnails(data.gallery, images_root, fetch_urls=fetch_urls)
    page = render(data, stats, thumbs, export_name=export_name, images_root=images_root, top_tags=top_tags,
                  notes=notes)
    return page, data


@dataclass
class ReportResult:
    path: str
    data: ReportData
    images_root: str | None
    bytes_written: int


def default_report_path(export_path: str) -> str:
    return export_path + ".report.html"


def write_report(
    export_path: str,
    out_path: str | None = None,
    images_root: str | None = None,
    *,
    max_gallery: int = DEFAULT_MAX_GALLERY,
    tag_field: str | None = None,
    max_failures: int = DEFAULT_MAX_FAILURES,
    top_tags: int = DEFAULT_TOP_TAGS,
    fetch_urls: bool = False,
) -> ReportResult:
    """Read `export_path` (and its `.stats.json`), write the report to `out_path` (default: next to the export)."""
    if max_gallery < 0:
        raise ConfigError(f"max_gallery={max_gallery}: expected a number ≥ 0")
    if top_tags < 0:
        raise ConfigError(f"top_tags={top_tags}: expected a number ≥ 0")
    if images_root is not None:
        if not os.path.isdir(images_root):
            raise ConfigError(f"--images-root={images_root!r}: no such folder")
        images_root = os.path.abspath(images_root)
    rows = iter_export_rows(export_path)
    next_row = next(rows, None)  # open the file now, so a missing or unreadable export fails before any work
    stats, note = load_stats(export_path)
    notes = [note] if note else []
    if images_root is None:
        recorded = stats.images_root if stats is not None else None
        if recorded:
            images_root = recorded
            if not os.path.isdir(recorded):
                notes.append(f"The images root recorded by the run ({recorded}) does not exist here; "
                             "pass --images-root to point at the images.")
        else:
            images_root = os.path.dirname(os.path.abspath(export_path))
            notes.append(f"No images root recorded; relative image paths were looked up next to the export "
                         f"({images_root}). Pass --images-root to change this.")

    def all_rows():
        if next_row is not None:
            yield next_row
        yield from rows

    page, data = build_report(
        all_rows(), stats, images_root=images_root, tag_field=tag_field, max_gallery=max_gallery,
        max_failures=max_failures, top_tags=top_tags, fetch_urls=fetch_urls,
        export_name=os.path.basename(export_path), notes=notes,
    )
    out_path = out_path or default_report_path(export_path)
    encoded = page.encode("utf-8")
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as f:
            f.write(encoded)
    return ReportResult(path=out_path, data=data, images_root=images_root, bytes_written=len(encoded))
