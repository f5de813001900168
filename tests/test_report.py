"""`vlmtag report`: the user tags images, writes the report, and opens it (here in a real headless Chromium)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import jpeg_bytes, photo
from vlmtag.cli import main
from vlmtag.report import write_report
from vlmtag.stats import RunStats

# Untrusted text as a model or a dataset could produce it. Each payload, if it ever ran, marks <body>.
XSS_SCRIPT = "<script>document.body.setAttribute('data-pwned','script')</script>"
XSS_IMG = "<img src=x onerror=\"document.body.setAttribute('data-pwned','img')\">"
XSS_ATTR = "\"><img src=x onerror=\"document.body.setAttribute('data-pwned','attr')\">"
XSS_ALERT = "<script>alert(1)</script>"
XSS_PAYLOADS = (XSS_SCRIPT, XSS_IMG, XSS_ATTR, XSS_ALERT)


# ---------------------------------------------------------------------------------------------- helpers


class Dom(HTMLParser):
    """Every element of a page with its attributes, and the text of the page."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, {k: (v or "") for k, v in attrs}))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str, cls: str | None = None) -> list[dict]:
        return [a for t, a in self.elements if t == tag and (cls is None or cls in a.get("class", "").split())]

    def body(self) -> dict:
        return self.all("body")[0]

    @property
    def plain(self) -> str:
        return "".join(self.text)


def card(page: str, label: str) -> str:
    m = re.search(rf'<div class="label">{re.escape(label)}</div><div class="value">([^<]*)</div>', page)
    assert m, f"no {label!r} card in the header"
    return html.unescape(m.group(1))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def meta(tags: list, errors: list | None = None) -> dict:
    return {"__dj__meta__": {"image_tags": tags, "image_tags_errors": errors or [None] * len(tags)}}


def assert_no_injected_markup(dom: Dom) -> None:
    """No element, attribute or script on the page comes from the data."""
    for tag, attrs in dom.elements:
        assert not [k for k in attrs if k.startswith("on")], f"event handler attribute on <{tag}>: {attrs}"
        if tag == "img":
            assert attrs["src"].startswith("data:image/jpeg;base64,"), attrs["src"][:80]
    assert len(dom.all("script")) == 1, "the page has exactly one script, its own"


@pytest.fixture
def hand_export(tmp_path, photo_dir):
    """An export written by hand: good rows, hostile tags, a failure, a missing image, a URL, a row with no image.

    Paths are relative to an images folder the stats file names, as `vlmtag run` records it."""
    images = tmp_path / "dataset"
    images.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        shutil.copy(photo_dir / f"{name}.jpg", images / f"{name}.jpg")
    rows = [
        {"images": ["astronaut.jpg"], "text": "<__dj__image> An astronaut.", **meta([["person", "helmet"]])},
        {"images": ["chelsea.jpg"], "text": f"<__dj__image> A cat {XSS_SCRIPT}",
         **meta([["cat", XSS_SCRIPT, XSS_IMG, XSS_ATTR, XSS_ALERT]])},
        {"images": ["coffee.jpg", "rocket.jpg"], **meta([["cup", "cat"], ["rocket"]])},
        {"images": ["gone.jpg"], **meta([["cat", "sofa"]])},  # tagged, then the file was deleted
        {"images": [XSS_IMG + ".jpg"], **meta([[]], [f"file not found: {XSS_IMG}.jpg"])},
        {"images": ["chelsea.jpg"], **meta([[]], [f"unparsable answer: {XSS_SCRIPT}"])},
        {"images": ["https://images.example.invalid/a.jpg"], **meta([["remote"]])},
        {"text": "a row with no image", **meta([[]])},
    ]
    export = tmp_path / "out" / "tagged.jsonl"
    export.parent.mkdir()
    write_jsonl(export, rows)
    # The stats file as the run writes it: the same object, the same schema (and a hostile dataset name in it).
    dataset = str(images / f"data {XSS_IMG}.jsonl")
    RunStats(
        rows=8, images=8, tagged=6, failed=2, failure_reasons={"file not found": 1, "unparsable answer": 1},
        rows_processed=6, rows_already_tagged=2, images_processed=8, requests=9, retries=2, prompt_tokens=12345,
        completion_tokens=678, wall_seconds=3.5, export_path=str(export), dataset_path=dataset,
        images_root=str(images), rows_written=8, completed=True,
        parts=[{"output": str(export), "shard": dataset, "images_root": str(images)}],
        provenance={"vlmtag_version": "0.1.0", "ops": [{
            "engine": "api", "model": "Qwen/Qwen2.5-VL-7B-Instruct", "tag_field_name": "image_tags",
            "prompt_sha256": "0123456789abcdef", "sampling_params": {"temperature": 0.0}}]},
    ).write(str(export) + ".stats.json")
    return export


def gallery_items(dom: Dom) -> list[dict]:
    return dom.all("figure", "item")


# ---------------------------------------------------------------------------------------------- the page


def test_report_of_a_real_run_matches_its_stats(tmp_path, photo_dir, monkeypatch):
    # The user tags a folder by its relative name, then writes the report from somewhere else.
    monkeypatch.chdir(photo_dir.parent)
    out = tmp_path / "tagged.jsonl"
    assert main(["-q", "tag", photo_dir.name, "-o", str(out)]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "report", str(out), "-o", "report.html"]) == 0

    stats = json.loads((tmp_path / "tagged.jsonl.stats.json").read_text())
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    for label, key in (("Rows", "rows"), ("Images", "images"), ("Tagged", "tagged"), ("Failed", "failed"),
                       ("Retries", "retries")):
        assert card(page, label) == f"{stats[key]:,}", label
    dom = Dom(page)
    items = gallery_items(dom)
    assert len(items) == stats["images"] == 4
    assert len(dom.all("img")) == 4, "every photo found through the images root the run recorded"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    all_tags = {t for r in rows for tags in r["__dj__meta__"]["image_tags"] for t in tags}
    chart = {a["data-tag"] for a in dom.all("button", "label")}
    assert chart == all_tags
    assert "builtin:default" in page and "embedded" in page
    assert "No failed images." in page


def test_untrusted_text_shows_as_text(hand_export, tmp_path):
    result = write_report(str(hand_export), str(tmp_path / "r.html"))
    page = Path(result.path).read_text(encoding="utf-8")
    dom = Dom(page)

    for payload in XSS_PAYLOADS:
        assert html.escape(payload, quote=True) in page
        assert payload in dom.plain, "shown to the reader as the text it is"
    assert "<script>alert" not in page and "<img src=x" not in page and "<script>document" not in page
    assert_no_injected_markup(dom)
    # The filter reads tags from data- attributes; they hold the exact strings.
    tags = json.loads(gallery_items(dom)[1]["data-tags"])
    assert tags == ["cat", XSS_SCRIPT, XSS_IMG, XSS_ATTR, XSS_ALERT]
    assert XSS_ATTR in {a["data-tag"] for a in dom.all("button", "tag")}
    # Nothing on the page can reach the network.
    csp = next(m["content"] for m in dom.all("meta") if m.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in csp and "img-src data:" in csp


def test_counts_failures_and_placeholders(hand_export, tmp_path):
    result = write_report(str(hand_export), str(tmp_path / "r.html"))
    page = Path(result.path).read_text(encoding="utf-8")
    dom = Dom(page)

    assert (card(page, "Images"), card(page, "Tagged"), card(page, "Failed")) == ("8", "6", "2")
    assert (card(page, "Tokens in"), card(page, "Tokens out")) == ("12.3k", "678")
    assert '<div class="sub">12,345</div>' in page
    # Rows that had the tag field before the run, as the run counted them.
    assert '<div class="label">Rows</div><div class="value">8</div><div class="sub">2 already tagged</div>' in page
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in page
    d = result.data
    assert (d.rows, d.images, d.tagged, d.failed, d.rows_without_images) == (8, 8, 6, 2, 1)
    assert d.tag_counts["cat"] == 3  # chelsea, coffee, gone
    items = gallery_items(dom)
    assert [i["data-status"] for i in items] == ["ok", "ok", "ok", "ok", "ok", "failed", "failed", "ok"]
    # Found: astronaut, chelsea, coffee, rocket; the failed chelsea row too. Not found: gone.jpg, the hostile
    # path. Not fetched: the URL.
    assert len(dom.all("img")) == 5
    placeholders = re.findall(r'<div class="thumb ph"><span>([^<]*)</span>', page)
    assert sorted(placeholders) == ["URL not fetched", "missing image", "missing image"]
    assert "https://images.example.invalid/a.jpg" in dom.plain
    # The failures table: one line per failed image, with its path and reason.
    table = page.split('id="failures-table"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 1 + 2
    assert html.escape(f"unparsable answer: {XSS_SCRIPT}") in table
    assert html.escape(XSS_IMG + ".jpg") in table
    # The chart: the most frequent tag first, with its count.
    first = dom.all("button", "label")[0]
    assert first["data-tag"] == "cat"


def test_images_root_override(hand_export, tmp_path):
    # The images moved after the run: the recorded root no longer holds them.
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "dataset"), moved)
    stale = write_report(str(hand_export), str(tmp_path / "stale.html"))
    page = Path(stale.path).read_text(encoding="utf-8")
    assert len(Dom(page).all("img")) == 0
    assert "does not exist here" in page and "--images-root" in page

    fixed = write_report(str(hand_export), str(tmp_path / "fixed.html"), images_root=str(moved))
    assert len(Dom(Path(fixed.path).read_text(encoding="utf-8")).all("img")) == 5


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_json_array_and_parquet_exports(tmp_path, fmt):
    """Parquet keeps image bytes in a column; the thumbnails come from them (no file on disk)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    cat, coffee = jpeg_bytes(photo("chelsea")), jpeg_bytes(photo("coffee"))
    rows = [
        {"images": ["a.jpg"], "image_bytes": [cat], **meta([["cat"]])},
        {"images": ["b.jpg"], "image_bytes": [coffee], **meta([[]], ["engine error: HTTP 500"])},
    ]
    export = tmp_path / f"tagged.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), export)
    else:
        import base64  # vlmtag's JSON writer stores bytes as base64 text

        for r in rows:
            r["image_bytes"] = [base64.b64encode(b).decode() for b in r["image_bytes"]]
        export.write_text(json.dumps(rows), encoding="utf-8")
    result = write_report(str(export))
    assert result.path == str(export) + ".report.html"
    page = Path(result.path).read_text(encoding="utf-8")
    assert (result.data.images, result.data.tagged, result.data.failed) == (2, 1, 1)
    assert len(Dom(page).all("img")) == 2
    assert "no stats file" in page
    assert "engine error: HTTP 500" in page


def test_large_export_is_sampled_and_counted_in_full(tmp_path):
    n = 20_000
    pool = [f"tag{i:02d}" for i in range(40)]
    rows = []
    for i in range(n):
        if i % 7 == 0:
            rows.append({"images": [f"img/{i}.jpg"], **meta([[]], [f"timeout: no answer for image {i}"])})
        else:
            rows.append({"images": [f"img/{i}.jpg"], **meta([[pool[i % 40], pool[(i * 3) % 40]]])})
    export = tmp_path / "big.jsonl"
    write_jsonl(export, rows)
    result = write_report(str(export), str(tmp_path / "big.html"), max_gallery=150)

    failed = len(range(0, n, 7))
    d = result.data
    assert (d.rows, d.images, d.failed, d.tagged) == (n, n, failed, n - failed)
    expected = {}
    for i in range(n):
        if i % 7:
            for t in {pool[i % 40], pool[(i * 3) % 40]}:
                expected[t] = expected.get(t, 0) + 1
    assert dict(d.tag_counts) == expected
    page = Path(result.path).read_text(encoding="utf-8")
    dom = Dom(page)
    items = gallery_items(dom)
    assert len(items) == 150
    where = [int(m.replace(",", "")) for m in re.findall(r'<div class="where">row ([\d,]+)', page)]
    assert len(where) == 150 and where == sorted(where), "the sample is shown in export order"
    assert where[-1] > n // 2, "the sample reaches past the start of the export"
    assert len(dom.all("li", "bar-row")) == 30
    table = page.split('id="failures-table"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 1 + 500
    assert f"… and {failed - 500:,} more failures not listed." in page
    assert "timeout" in page  # the reasons summary
    assert len(page.encode()) < 2_000_000


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such export file" in capsys.readouterr().err
    (tmp_path / "x.csv").write_text("a,b\n")
    assert main(["report", str(tmp_path / "x.csv")]) == 2
    assert "unsupported format" in capsys.readouterr().err
    (tmp_path / "ok.jsonl").write_text("")
    assert main(["report", str(tmp_path / "ok.jsonl"), "--max-gallery", "-1"]) == 2
    assert "--max-gallery" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "ok.jsonl"), "--images-root", str(tmp_path / "nowhere")]) == 2
    assert "--images-root" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("[{")
    assert main(["report", str(tmp_path / "broken.json")]) == 2
    assert "cannot read the export" in capsys.readouterr().err


def test_custom_tag_field_and_empty_export(tmp_path):
    export = tmp_path / "t.jsonl"
    write_jsonl(export, [{"images": ["a.jpg"], "__dj__meta__": {"labels": [["x", "y"]], "labels_errors": [None]}}])
    result = write_report(str(export), tag_field="labels")
    assert (result.data.tagged, dict(result.data.tag_counts)) == (1, {"x": 1, "y": 1})
    wrong = Path(write_report(str(export), str(tmp_path / "wrong.html")).path).read_text(encoding="utf-8")
    assert "No row has the tag field &#x27;image_tags&#x27;; pick the right one with --field." in wrong
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    page = Path(write_report(str(empty)).path).read_text(encoding="utf-8")
    assert "No tags in this export." in page and "No failed images." in page


# ---------------------------------------------------------------------------------------------- in a browser


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium found (install the Debian package `chromium`; .ci/run does, so CI always runs this test)",
)


def chromium(url: str, tmp_path: Path, *extra: str) -> str:
    """Open `url` in a fresh headless Chromium and return the DOM after the page's scripts ran."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--no-first-run", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", "--virtual-time-budget=3000", *extra, url]
    # The timeout only guards against a hung browser; nothing here measures time.
    done = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@needs_chromium
def test_sentinel_catches_a_page_that_does_not_escape(tmp_path):
    """The check below is real: in this browser, the same payloads unescaped do run and mark <body>."""
    page = tmp_path / "unsafe.html"
    page.write_text(f"<!doctype html><html><body><p>{XSS_IMG}</p>{XSS_SCRIPT}</body></html>", encoding="utf-8")
    dom = Dom(chromium(page.as_uri(), tmp_path, "--dump-dom"))
    assert dom.body().get("data-pwned") in ("img", "script")


@needs_chromium
def test_report_renders_in_chromium_and_runs_no_injected_script(hand_export, tmp_path):
    result = write_report(str(hand_export), str(tmp_path / "report.html"))
    url = Path(result.path).as_uri()

    dom = Dom(chromium(url, tmp_path, "--dump-dom"))
    body = dom.body()
    assert body.get("data-ready") == "1", "the page's own script ran"
    assert "data-pwned" not in body, f"a script from the data ran: {body.get('data-pwned')}"
    items = gallery_items(dom)
    assert body["data-items"] == body["data-shown"] == str(len(items)) == "8"
    assert not [i for i in items if "hidden" in i]
    bars = dom.all("li", "bar-row")
    assert len(bars) == len(result.data.tag_counts) == 11
    assert [s for s in dom.all("span", "fill") if "width:" in s.get("style", "")]
    assert len([i for i in dom.all("img") if i["src"].startswith("data:image/jpeg;base64,")]) == 5
    for payload in XSS_PAYLOADS:
        assert payload in dom.plain, "the hostile tag is on the page as text"
    assert_no_injected_markup(dom)

    # Filtering by tag, as a click on "cat" or a shared link does: the gallery keeps the images tagged cat.
    dom = Dom(chromium(url + "#tag=cat", tmp_path, "--dump-dom"))
    shown = [i for i in gallery_items(dom) if "hidden" not in i]
    assert dom.body()["data-shown"] == str(len(shown)) == "3"
    assert all("cat" in json.loads(i["data-tags"]) for i in shown)
    assert [b for b in dom.all("button", "active") if b["data-tag"] == "cat"]

    # Filtering by a hostile tag finds its image and runs nothing.
    dom = Dom(chromium(url + "#tag=" + urllib.parse.quote(XSS_IMG, safe=""), tmp_path, "--dump-dom"))
    assert dom.body()["data-filter"] == XSS_IMG
    assert dom.body()["data-shown"] == "1"
    assert "data-pwned" not in dom.body()
    assert_no_injected_markup(dom)

    # And it draws: a screenshot of the page (kept next to the report for a person to look at).
    shot = tmp_path / "report.png"
    chromium(url, tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


@needs_chromium
def test_clicking_a_tag_and_typing_filter_the_gallery(hand_export, tmp_path):
    """The page's filter reacts to a click on a chart tag and to typing. A driver script stands in for the user;
    the page's policy only lets its own script run, so this test copy leaves the policy out."""
    result = write_report(str(hand_export), str(tmp_path / "report.html"))
    page = Path(result.path).read_text(encoding="utf-8")
    page = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
    driver = """<script>
    var b = document.body, log = [];
    function note() { log.push(b.getAttribute("data-shown") + ":" + b.getAttribute("data-filter")); }
    document.querySelector('#chart button[data-tag="cat"]').click(); note();
    document.querySelector('#chart button[data-tag="cat"]').click(); note();
    var box = document.getElementById("filter");
    box.value = "ROCK"; box.dispatchEvent(new Event("input")); note();
    document.getElementById("failed-only").click(); box.value = ""; box.dispatchEvent(new Event("input")); note();
    document.getElementById("clear").click(); note();
    b.setAttribute("data-log", log.join("|"));
    </script></body>"""
    driven = tmp_path / "driven.html"
    driven.write_text(page.replace("</body>", driver), encoding="utf-8")
    dom = Dom(chromium(driven.as_uri(), tmp_path, "--dump-dom"))
    assert dom.body()["data-log"] == "3:cat|8:|1:rock|2:|8:"


def test_report_and_eval_read_a_folder_export(tmp_path, photo_dir):
    """A folder of input shards gives a folder export (one part per shard); report and eval read all parts."""
    import json as _json

    from vlmtag.cli import main as cli_main

    shards = tmp_path / "shards"
    shards.mkdir()
    for i, names in enumerate([("coffee", "chelsea"), ("rocket",)]):
        (shards / f"part-{i}.jsonl").write_text("".join(
            _json.dumps({"images": [str(photo_dir / f"{n}.jpg")]}) + "\n" for n in names))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_json.dumps({"dataset_path": str(shards), "export_path": str(tmp_path / "out"),
                                   "process": [{"image_tagging_vlm_mapper": {"api_or_hf_model": "builtin:default"}}]}))
    assert cli_main(["-q", "run", "--config", str(recipe)]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part-0.jsonl", "part-1.jsonl"]
    html_path = tmp_path / "report.html"
    assert cli_main(["-q", "report", str(tmp_path / "out"), "-o", str(html_path)]) == 0
    assert html_path.read_text().count('class="card') >= 3
    gold = tmp_path / "gold.jsonl"
    gold.write_text("".join(_json.dumps({"images": [str(photo_dir / f"{n}.jpg")], "labels": [[lab]]}) + "\n"
                            for n, lab in [("coffee", "cup"), ("chelsea", "cat"), ("rocket", "missile")]))
    scores = tmp_path / "scores.json"
    assert cli_main(["-q", "eval", "--pred", str(tmp_path / "out"), "--gold", str(gold), "--json", str(scores)]) == 0
    result = _json.loads(scores.read_text())
    assert result["micro"]["recall"] == 1.0
