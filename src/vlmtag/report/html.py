"""The HTML report: one self-contained static file (inline CSS and JS, thumbnails as data: URLs, no network).

Every piece of text that comes from a dataset or a model (tags, errors, paths, captions, stats values) goes
through `_e` (html.escape with quotes) before it reaches the page; the filter script reads tags only from
escaped `data-` attributes and writes only with `textContent`. A Content-Security-Policy allows nothing but
this page's own script (by hash), inline styles and data: images, so even a slip in escaping could run no
injected script and fetch nothing.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import json
import os
from dataclasses import dataclass
from typing import Iterable

from vlmtag import __version__
from vlmtag.errors import ConfigError
from vlmtag.io.exports import iter_export_rows
from vlmtag.report.collect import Entry, ReportData, collect, load_stats
from vlmtag.report.thumbnails import Thumbnail, make_thumbnails

DEFAULT_MAX_GALLERY = 200
DEFAULT_MAX_FAILURES = 500
DEFAULT_TOP_TAGS = 30
CO_OCCURRENCE_TAGS = 15
_MAX_SHOWN = 300  # characters of a path, URL or reason shown in the page


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _short(text: str, limit: int = _MAX_SHOWN) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shown_source(source: str | None) -> str:
    if source is None:
        return "(image bytes)"
    if source[:5].lower() == "data:":
        return f"data: URI ({len(source):,} characters)"
    return _short(source)


def _int(stats: dict, key: str) -> int | None:
    v = stats.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


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


def _op_info(stats: dict, tag_field: str) -> dict:
    prov = stats.get("provenance")
    ops = prov.get("ops") if isinstance(prov, dict) else None
    ops = [o for o in ops if isinstance(o, dict)] if isinstance(ops, list) else []
    for op in ops:
        if op.get("tag_field_name") == tag_field:
            return op
    return ops[0] if ops else {}


def default_tag_field(stats: dict | None) -> str:
    op = _op_info(stats or {}, "")
    name = op.get("tag_field_name")
    return name if isinstance(name, str) and name else "image_tags"


# ---------------------------------------------------------------------------------------------- page parts


def _card(label: str, value: str, sub: str = "", cls: str = "") -> str:
    sub_html = f'<div class="sub">{_e(sub)}</div>' if sub else ""
    return f'<div class="card {cls}"><div class="label">{_e(label)}</div><div class="value">{_e(value)}</div>{sub_html}</div>'


def _header(data: ReportData, stats: dict | None, export_name: str, images_root: str | None,
            notes: list[str]) -> str:
    s = stats or {}
    op = _op_info(s, data.tag_field)
    have = stats is not None
    rows = _int(s, "rows") if have else data.rows
    images = _int(s, "images") if have else data.images
    tagged = _int(s, "tagged") if have else data.tagged
    failed = _int(s, "failed") if have else data.failed
    pin, pout = _int(s, "prompt_tokens"), _int(s, "completion_tokens")
    ips = s.get("images_per_second")
    cards = [
        _card("Rows", _num(rows), f"{_num(_int(s, 'rows_skipped'))} already tagged" if _int(s, "rows_skipped") else ""),
        _card("Images", _num(images)),
        _card("Tagged", _num(tagged), _pct(tagged or 0, images or 0) if images else "", "ok"),
        _card("Failed", _num(failed), _pct(failed or 0, images or 0) if images else "", "bad" if failed else ""),
        _card("Retries", _num(_int(s, "retries")), f"{_num(_int(s, 'requests'))} requests" if _int(s, "requests") is not None else ""),
        _card("Tokens in", _compact(pin), _num(pin) if pin is not None and pin >= 10_000 else ""),
        _card("Tokens out", _compact(pout), _num(pout) if pout is not None and pout >= 10_000 else ""),
        _card("Wall time", _duration(s.get("wall_seconds"))),
        _card("Images / s", f"{ips:,.2f}" if isinstance(ips, (int, float)) and not isinstance(ips, bool) else "—"),
    ]
    if not have:
        status = '<span class="badge warn">no run stats</span>'
    elif s.get("completed") is False or s.get("aborted"):
        status = f'<span class="badge bad">aborted: {_e(_short(str(s.get("aborted") or "not completed"), 160))}</span>'
    else:
        status = '<span class="badge ok">completed</span>'
    run_bits = [
        ("model", op.get("model")),
        ("engine", op.get("engine")),
        ("tag field", data.tag_field),
        ("prompt sha256", op.get("prompt_sha256")),
        ("sampling", json.dumps(op["sampling_params"], sort_keys=True) if op.get("sampling_params") else None),
        ("vlmtag", (s.get("provenance") or {}).get("vlmtag_version") if isinstance(s.get("provenance"), dict) else None),
    ]
    run_line = " ".join(
        f'<span class="kv"><span class="k">{_e(k)}</span> <code>{_e(_short(str(v), 200))}</code></span>'
        for k, v in run_bits if v not in (None, "")
    )
    where = [
        ("export", export_name),
        ("dataset", s.get("dataset_path")),
        ("images root", images_root),
    ]
    where_line = " ".join(
        f'<span class="kv"><span class="k">{_e(k)}</span> <code>{_e(_short(str(v), 200))}</code></span>'
        for k, v in where if v not in (None, "")
    )
    export_line = " · ".join(
        [f"This export: {_count(data.rows, 'row')}", _count(data.images, "image"), f"{data.tagged:,} tagged",
         f"{data.failed:,} failed"]
        + ([f"{_count(data.rows_untagged, 'row')} without the tag field"] if data.rows_untagged else [])
        + ([f"{_count(data.rows_without_images, 'row')} without images"] if data.rows_without_images else [])
        + ([f"{_count(data.rows_unreadable, 'unreadable line')}"] if data.rows_unreadable else [])
    )
    notes_html = "".join(f'<li>{_e(n)}</li>' for n in notes)
    notes_html = f'<ul class="notes">{notes_html}</ul>' if notes_html else ""
    all_stats = ""
    if have:
        rows_html = "".join(
            f"<tr><th>{_e(k)}</th><td><code>{_e(_short(json.dumps(v, ensure_ascii=False, default=str), 2000))}</code></td></tr>"
            for k, v in s.items()
        )
        all_stats = f'<details class="allstats"><summary>All run stats</summary><table>{rows_html}</table></details>'
    return f"""<header id="overview">
<div class="title"><h1>vlmtag report</h1> {status}</div>
<div class="meta">{where_line}</div>
<div class="cards" id="stats">{''.join(cards)}</div>
<div class="meta">{run_line}</div>
<p class="export-line" id="export-counts">{_e(export_line)}</p>
{notes_html}{all_stats}
</header>"""


def _tag_button(tag: str, count: int | None = None, cls: str = "tag") -> str:
    n = f' <span class="c">{count:,}</span>' if count is not None else ""
    return f'<button type="button" class="{cls}" data-tag="{_e(tag)}" title="{_e(_short(tag))}">{_e(_short(tag, 80))}{n}</button>'


def _tags_section(data: ReportData, top: int) -> str:
    common = data.tag_counts.most_common(top) if top > 0 else []
    if not common:
        return '<section id="tags"><h2>Tags</h2><p class="empty">No tags in this export.</p></section>'
    biggest = common[0][1]
    bars = []
    for tag, n in common:
        width = 100.0 * n / biggest
        bars.append(
            f'<li class="bar-row">{_tag_button(tag, cls="tag label")}'
            f'<span class="bar"><span class="fill" style="width:{width:.1f}%"></span></span>'
            f'<span class="n">{n:,} <span class="pct">{_pct(n, data.tagged)}</span></span></li>'
        )
    total = sum(data.tag_counts.values())
    summary = (f"{len(data.tag_counts):,} distinct tags, {total:,} tags on {data.tagged:,} tagged images"
               f" ({total / data.tagged:.1f} per image)" if data.tagged else "")
    if data.tagged_empty:
        summary += f"; {data.tagged_empty:,} images got no tags"
    co_rows = []
    for tag, partners in data.co_occurrence.items():
        with_html = " ".join(_tag_button(t, k, cls="tag small") for t, k in partners) or '<span class="muted">—</span>'
        co_rows.append(f"<tr><td>{_tag_button(tag)}</td><td class='num'>{data.tag_counts[tag]:,}</td><td>{with_html}</td></tr>")
    co_html = ""
    if co_rows:
        co_html = (f'<h3>Seen together</h3><p class="hint">For the {len(co_rows)} most frequent tags, the tags most '
                   f'often on the same image (over all tagged images).</p>'
                   f'<table class="co"><thead><tr><th>Tag</th><th class="num">Images</th><th>Most often with</th></tr></thead>'
                   f'<tbody>{"".join(co_rows)}</tbody></table>')
    return f"""<section id="tags">
<h2>Tags</h2>
<p class="hint">{_e(summary)}. Top {len(common)}, share of tagged images. Click a tag to see its images in the gallery.</p>
<ol class="chart" id="chart">{''.join(bars)}</ol>
{co_html}
</section>"""


def _thumb_html(entry: Entry, thumb: Thumbnail) -> str:
    shown = _shown_source(entry.source)
    if thumb.data_url:
        size = f' width="{thumb.width}" height="{thumb.height}"' if thumb.width else ""
        return f'<div class="thumb"><img src="{_e(thumb.data_url)}" alt="{_e(shown)}"{size}></div>'
    return f'<div class="thumb ph"><span>{_e(thumb.note or "no image")}</span></div>'


def _gallery_item(entry: Entry, thumb: Thumbnail) -> str:
    status = "untagged" if entry.untagged else ("failed" if entry.error is not None else "ok")
    shown = _shown_source(entry.source)
    name = shown if entry.source is None or "://" in shown or shown.startswith("data:") else os.path.basename(shown) or shown
    tags = "".join(_tag_button(t) for t in entry.tags)
    if status == "ok" and not entry.tags:
        tags = '<span class="muted">no tags</span>'
    err = f'<div class="err">{_e(_short(entry.error or ""))}</div>' if status == "failed" else ""
    if status == "untagged":
        err = '<div class="err muted">not tagged (no tag field in this row)</div>'
    cap = f'<div class="cap" title="{_e(entry.caption)}">{_e(entry.caption)}</div>' if entry.caption else ""
    where = f"row {entry.row:,}" + (f" · image {entry.position + 1}" if entry.position else "")
    return (
        f'<figure class="item {status}" data-status="{status}" data-tags="{_e(json.dumps(entry.tags, ensure_ascii=False))}">'
        f"{_thumb_html(entry, thumb)}<figcaption>"
        f'<div class="path" title="{_e(shown)}">{_e(name)}</div><div class="where">{_e(where)}</div>'
        f'<div class="tags">{tags}</div>{err}{cap}</figcaption></figure>'
    )


def _gallery_section(data: ReportData, thumbs: list[Thumbnail]) -> str:
    n = len(data.gallery)
    if n == data.images:
        what = f"All {n:,} images."
    else:
        what = f"A random sample of {n:,} of {data.images:,} images (counts and the chart cover all of them)."
    items = "".join(_gallery_item(e, t) for e, t in zip(data.gallery, thumbs))
    return f"""<section id="gallery-section">
<h2>Gallery</h2>
<p class="hint">{_e(what)}</p>
<div class="controls">
<input id="filter" type="search" placeholder="Filter by tag…" autocomplete="off" aria-label="Filter by tag">
<label><input id="failed-only" type="checkbox"> failed only</label>
<button type="button" id="clear">Clear</button>
<span class="shown">showing <b id="shown">{n:,} of {n:,}</b></span>
</div>
<p id="no-match" class="empty" hidden>No image in the gallery matches.</p>
<div class="grid" id="gallery" data-count="{n}">{items}</div>
</section>"""


def _failures_section(data: ReportData) -> str:
    if not data.failed:
        return '<section id="failures"><h2>Failures</h2><p class="empty">No failed images.</p></section>'
    reasons = "".join(
        f"<tr><td>{_e(_short(r, 200))}</td><td class='num'>{n:,}</td><td class='num'>{_pct(n, data.failed)}</td></tr>"
        for r, n in data.failure_reasons.most_common(20)
    )
    rows = "".join(
        f"<tr><td class='num'>{e.row:,}</td><td class='path'>{_e(_shown_source(e.source))}</td>"
        f"<td class='reason'>{_e(_short(e.error or ''))}</td></tr>"
        for e in data.failures
    )
    more = ""
    if data.failures_not_listed > 0:
        more = f'<p class="more">… and {data.failures_not_listed:,} more failures not listed.</p>'
    return f"""<section id="failures">
<h2>Failures <span class="badge bad">{data.failed:,}</span></h2>
<table class="reasons"><thead><tr><th>Reason</th><th class="num">Images</th><th class="num">Share</th></tr></thead>
<tbody>{reasons}</tbody></table>
<table class="failures" id="failures-table"><thead><tr><th class="num">Row</th><th>Image</th><th>Reason</th></tr></thead>
<tbody>{rows}</tbody></table>
{more}
</section>"""


# ---------------------------------------------------------------------------------------------- static assets

_CSS = """
:root{--fg:#1d2330;--muted:#6b7385;--line:#e3e6ec;--bg:#f6f7f9;--card:#fff;--accent:#3563e9;--ok:#1f8a4c;--bad:#c0392b;--warn:#b7791f}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1280px;margin:0 auto;padding:20px 24px 48px}
nav{position:sticky;top:0;z-index:5;background:rgba(246,247,249,.95);border-bottom:1px solid var(--line)}
nav div{max-width:1280px;margin:0 auto;padding:8px 24px;display:flex;gap:18px}
nav a{color:var(--muted);text-decoration:none;font-weight:600}
nav a:hover{color:var(--accent)}
h1{font-size:24px;margin:0}
h2{font-size:18px;margin:0 0 8px}
h3{font-size:15px;margin:22px 0 4px}
section,header{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 20px;margin:16px 0}
.title{display:flex;align-items:center;gap:12px;margin-bottom:6px}
.meta{color:var(--muted);margin:6px 0;display:flex;flex-wrap:wrap;gap:6px 18px}
.kv .k{color:var(--muted)}
code{font:12.5px/1.3 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f0f2f5;border-radius:4px;padding:1px 5px;overflow-wrap:anywhere}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(118px,1fr));gap:10px;margin:12px 0}
.card{border:1px solid var(--line);border-radius:8px;padding:10px 12px;background:#fbfcfd}
.card .label{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .value{font-size:21px;font-weight:650;font-variant-numeric:tabular-nums;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.card .sub{color:var(--muted);font-size:12px}
.card.ok .value{color:var(--ok)} .card.bad .value{color:var(--bad)}
.badge{display:inline-block;border-radius:999px;padding:2px 10px;font-size:12px;font-weight:600;color:#fff;background:var(--muted);vertical-align:middle}
.badge.ok{background:var(--ok)} .badge.bad{background:var(--bad)} .badge.warn{background:var(--warn)}
.export-line{color:var(--muted);margin:4px 0}
.notes{margin:8px 0;padding:8px 12px 8px 28px;background:#fff8e6;border:1px solid #f2dfae;border-radius:8px;color:#6b4e00}
details.allstats{margin-top:8px} details.allstats summary{cursor:pointer;color:var(--accent)}
details.allstats table{margin-top:6px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12px;color:var(--muted);font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.hint{color:var(--muted);margin:0 0 10px}
.empty,.muted{color:var(--muted)}
.chart{list-style:none;margin:0;padding:0;display:grid;gap:4px}
.bar-row{display:grid;grid-template-columns:minmax(120px,220px) 1fr 110px;align-items:center;gap:10px}
.bar-row .label{justify-self:start;max-width:100%}
.bar{height:16px;background:#eef1f6;border-radius:4px;overflow:hidden}
.bar .fill{display:block;height:100%;background:linear-gradient(90deg,#5b82f0,#3563e9);border-radius:4px;min-width:2px}
.bar-row .n{font-variant-numeric:tabular-nums;text-align:right}
.pct{color:var(--muted);font-size:12px}
.tag{font:inherit;font-size:12.5px;border:1px solid #d5dbe7;background:#f2f5fb;color:#24304a;border-radius:999px;padding:1px 9px;margin:2px 3px 2px 0;cursor:pointer;max-width:100%;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.tag:hover{border-color:var(--accent);color:var(--accent)}
.tag.active{background:var(--accent);border-color:var(--accent);color:#fff}
.tag .c{color:var(--muted);font-size:11px}
.tag.active .c{color:#dfe7ff}
.tag.small{font-size:11.5px;padding:0 7px}
.controls{display:flex;flex-wrap:wrap;align-items:center;gap:12px;margin:8px 0 14px;position:sticky;top:38px;background:var(--card);padding:6px 0;z-index:4}
#filter{font:inherit;padding:6px 10px;border:1px solid #cfd5e1;border-radius:6px;min-width:260px}
#clear{font:inherit;padding:5px 12px;border:1px solid #cfd5e1;border-radius:6px;background:#fff;cursor:pointer}
.shown{color:var(--muted);margin-left:auto}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:12px}
.item{margin:0;border:1px solid var(--line);border-radius:8px;overflow:hidden;background:#fff;display:flex;flex-direction:column}
.item[hidden]{display:none}
.item.failed{border-color:#efc2bc}
.thumb{height:170px;background:#eceff3;display:flex;align-items:center;justify-content:center}
.thumb img{width:100%;height:100%;object-fit:cover;display:block}
.thumb.ph span{color:var(--muted);font-size:12.5px;padding:0 10px;text-align:center;border:1px dashed #c5cbd6;border-radius:6px;padding:18px 12px}
figcaption{padding:8px 10px 10px;display:flex;flex-direction:column;gap:3px;min-width:0}
.path{font-weight:600;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.where{color:var(--muted);font-size:12px}
.err{color:var(--bad);font-size:12.5px;overflow-wrap:anywhere}
.cap{color:var(--muted);font-size:12px;display:-webkit-box;-webkit-line-clamp:2;-webkit-box-orient:vertical;overflow:hidden}
table.co td:first-child{width:240px}
table.reasons{width:auto;min-width:50%;margin-bottom:14px}
table.failures td.path{width:40%;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px;overflow-wrap:anywhere}
table.failures td.reason{color:var(--bad);overflow-wrap:anywhere}
.more{color:var(--muted);font-style:italic}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:20px}
"""

# The page's only script. It takes no data from Python (tags come from escaped data- attributes) so its hash,
# which the Content-Security-Policy names, is fixed.
_JS = """
(function () {
  "use strict";
  var body = document.body;
  var grid = document.getElementById("gallery");
  var items = grid ? Array.prototype.slice.call(grid.querySelectorAll(".item")) : [];
  var box = document.getElementById("filter");
  var failedOnly = document.getElementById("failed-only");
  var shown = document.getElementById("shown");
  var noMatch = document.getElementById("no-match");
  var tagsOf = items.map(function (el) {
    try {
      var t = JSON.parse(el.getAttribute("data-tags") || "[]");
      return Array.isArray(t) ? t.map(String) : [];
    } catch (err) { return []; }
  });
  var exact = null;

  function apply() {
    var q = box ? box.value.trim().toLowerCase() : "";
    var n = 0;
    items.forEach(function (el, i) {
      var tags = tagsOf[i];
      var ok = exact !== null ? tags.indexOf(exact) >= 0
        : (q === "" || tags.some(function (t) { return t.toLowerCase().indexOf(q) >= 0; }));
      if (failedOnly && failedOnly.checked && el.getAttribute("data-status") !== "failed") { ok = false; }
      el.hidden = !ok;
      if (ok) { n++; }
    });
    if (shown) { shown.textContent = n + " of " + items.length; }
    if (noMatch) { noMatch.hidden = n !== 0 || items.length === 0; }
    Array.prototype.forEach.call(document.querySelectorAll(".tag[data-tag]"), function (el) {
      el.classList.toggle("active", exact !== null && el.getAttribute("data-tag") === exact);
    });
    body.setAttribute("data-shown", String(n));
    body.setAttribute("data-filter", exact !== null ? exact : q);
  }

  function remember(hash) {
    try { history.replaceState(null, "", hash || location.pathname + location.search); } catch (err) { /* file: */ }
  }

  function setTag(tag, scroll) {
    exact = tag;
    if (box) { box.value = tag === null ? "" : tag; }
    apply();
    remember(tag === null ? "" : "#tag=" + encodeURIComponent(tag));
    if (scroll && grid) { document.getElementById("gallery-section").scrollIntoView(); }
  }

  document.addEventListener("click", function (ev) {
    var el = ev.target && ev.target.closest ? ev.target.closest("[data-tag]") : null;
    if (!el) { return; }
    ev.preventDefault();
    var tag = el.getAttribute("data-tag");
    var inGallery = grid && grid.contains(el);
    setTag(exact === tag ? null : tag, !inGallery);
  });
  if (box) {
    box.addEventListener("input", function () {
      exact = null;
      apply();
      remember(box.value ? "#q=" + encodeURIComponent(box.value) : "");
    });
  }
  if (failedOnly) { failedOnly.addEventListener("change", apply); }
  var clear = document.getElementById("clear");
  if (clear) {
    clear.addEventListener("click", function () {
      if (failedOnly) { failedOnly.checked = false; }
      setTag(null, false);
    });
  }

  var hash = location.hash || "";
  try {
    if (hash.indexOf("#tag=") === 0) {
      exact = decodeURIComponent(hash.slice(5));
      if (box) { box.value = exact; }
    } else if (hash.indexOf("#q=") === 0 && box) {
      box.value = decodeURIComponent(hash.slice(3));
    } else if (hash === "#failed" && failedOnly) {
      failedOnly.checked = true;
    }
  } catch (err) { exact = null; }
  apply();
  body.setAttribute("data-items", String(items.length));
  body.setAttribute("data-ready", "1");
})();
"""

_JS_HASH = base64.b64encode(hashlib.sha256(_JS.encode("utf-8")).digest()).decode("ascii")
CSP = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{_JS_HASH}'; "
       "base-uri 'none'; form-action 'none'")


# ---------------------------------------------------------------------------------------------- assembling


def render(data: ReportData, stats: dict | None, thumbs: list[Thumbnail], *, export_name: str = "",
           images_root: str | None = None, top_tags: int = DEFAULT_TOP_TAGS, notes: Iterable[str] = ()) -> str:
    """The page for already aggregated data (no I/O)."""
    notes = list(notes)
    if stats is not None:
        counted = {k: _int(stats, k) for k in ("images", "tagged", "failed")}
        mine = {"images": data.images, "tagged": data.tagged, "failed": data.failed}
        if all(v is not None for v in counted.values()) and counted != mine:
            notes.append(
                "The export's counts differ from the run's stats (rows that were already tagged before the run, "
                "or an export edited since, are counted here but not in the run)."
            )
    with_images = data.rows - data.rows_unreadable - data.rows_without_images
    if with_images and data.rows_untagged == with_images:
        notes.append(f"No row has the tag field {data.tag_field!r}; pick the right one with --field.")
    title = f"vlmtag report — {export_name}" if export_name else "vlmtag report"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">
<meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="vlmtag {_e(__version__)}">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<nav><div><a href="#overview">Overview</a><a href="#tags">Tags</a><a href="#gallery-section">Gallery</a><a href="#failures">Failures</a></div></nav>
<main>
{_header(data, stats, export_name, images_root, notes)}
{_tags_section(data, top_tags)}
{_gallery_section(data, thumbs)}
{_failures_section(data)}
<footer>Made by vlmtag {_e(__version__)} on {_e(now)}. Self-contained: opens offline.</footer>
</main>
<script>{_JS}</script>
</body>
</html>
"""


def build_report(
    rows: Iterable[dict],
    stats: dict | None,
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
        recorded = (stats or {}).get("images_root")
        if isinstance(recorded, str) and recorded:
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
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    encoded = page.encode("utf-8")
    try:
        with open(tmp, "wb") as f:
            f.write(encoded)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return ReportResult(path=out_path, data=data, images_root=images_root, bytes_written=len(encoded))
