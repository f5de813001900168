"""Odd files and odd endpoints, as a user meets them: no row disappears, every unread row is counted and said,
and a wrong address stops the run. Every input is generated here (no download)."""

from __future__ import annotations

import base64
import codecs
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from openai_server import OpenAIServer, say, user_text
from vlmtag.cli import main
from vlmtag.io import open_dataset
from vlmtag.rowkeys import INVALID_ROW_KEY, META_KEY


@pytest.fixture
def server():
    with OpenAIServer(decode=False) as s:
        s.behaviour = say
        yield s


def images(folder: Path, n: int) -> list[str]:
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.new("RGB", (32, 24), (i * 20 % 255, 90, 30)).save(folder / f"{i}.png")
    return [f"{folder.name}/{i}.png" for i in range(n)]


def recipe(tmp_path: Path, data: Path, base_url: str, **op) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"dataset_path": str(data), "export_path": str(tmp_path / "out.jsonl"),
                                    "process": [{"image_tagging_vlm_mapper": {
                                        "api_or_hf_model": "m", "is_api_model": True, "retry_backoff": 0.01,
                                        "model_params": {"base_url": base_url, "api_key": "k"}, **op}}]}))
    return path


def sent_size(body: dict) -> tuple[int, int]:
    """The size of the image a request carried (its data: URL)."""
    url = body["messages"][-1]["content"][1]["image_url"]["url"]
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size


def export(tmp_path: Path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]


def stats(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out.jsonl.stats.json").read_text())


def test_a_bom_at_the_start_of_jsonl_and_json_is_skipped(tmp_path, server):
    paths = images(tmp_path / "imgs", 3)
    lines = [json.dumps({"id": i, "images": [p], "text": f"say: t{i}"}) for i, p in enumerate(paths)]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(codecs.BOM_UTF8 + "\r\n".join(lines).encode() + b"\r\n")  # Notepad: BOM and CRLF
    assert main(["-q", "run", "--config", str(recipe(tmp_path, jsonl, server.base_url))]) == 0
    rows = export(tmp_path)
    assert [r["id"] for r in rows] == [0, 1, 2] and [r[META_KEY]["image_tags"] for r in rows] == [[["t0"]], [["t1"]],
                                                                                                    [["t2"]]]
    assert stats(tmp_path)["unreadable_rows"] == 0

    array = tmp_path / "bom.json"
    array.write_bytes(codecs.BOM_UTF8 + json.dumps([json.loads(x) for x in lines]).encode())
    assert [r["id"] for r in open_dataset(str(array))[0].batches(10).__next__()] == [0, 1, 2]


def test_a_malformed_line_and_a_latin1_line_are_kept_counted_and_said(tmp_path, server, capsys):
    paths = images(tmp_path / "imgs", 3)
    data = tmp_path / "rows.jsonl"
    data.write_bytes(json.dumps({"id": 0, "images": [paths[0]], "text": "say: a"}).encode() + b"\n"
                     + b'{"id": 1, "images": [\n'  # malformed
                     + '{"id": 2, "text": "caf\xe9"}\n'.encode("latin-1")  # not UTF-8
                     + b"[1, 2]\n"  # a JSON array, not an object
                     + json.dumps({"id": 4, "images": [paths[2]], "text": "say: c"}).encode() + b"\n")
    assert main(["run", "--config", str(recipe(tmp_path, data, server.base_url))]) == 0
    out = capsys.readouterr().out
    assert "unreadable rows: 3 (first at rows.jsonl line 2: invalid JSON on line 2" in out
    rows = export(tmp_path)
    assert len(rows) == 5 and rows[0]["id"] == 0 and rows[4]["id"] == 4  # every line, in place
    assert [INVALID_ROW_KEY in r for r in rows] == [False, True, True, True, False]
    latin = rows[2][INVALID_ROW_KEY]
    offset = len(json.dumps({"id": 0, "images": [paths[0]], "text": "say: a"})) + 1 + len(b'{"id": 1, "images": [\n')
    assert latin["line"] == 3 and latin["error"] == (
        f"rows.jsonl is not UTF-8: byte 0xe9 at byte offset {offset + 22} of the file (save it as UTF-8)")
    s = stats(tmp_path)
    assert s["unreadable_rows"] == 3 and s["first_unreadable"].startswith("rows.jsonl line 2: invalid JSON")
    assert s["tagged"] == 2 and s["failed"] == 0

    # --strict: the same input is an error before any request
    server.reset()
    again = recipe(tmp_path, data, server.base_url, try_num=2)  # another job: nothing is already done
    assert main(["run", "--config", str(again), "--strict"]) == 2
    assert "--strict: unreadable rows: 3 (first at rows.jsonl line 2" in capsys.readouterr().err
    assert server.count == 0


def test_a_json_array_that_is_not_utf8_is_one_clear_line_and_no_traceback(tmp_path, server, capsys, caplog):
    data = tmp_path / "rows.json"
    data.write_bytes('[{"id": 1, "text": "na\xefve"}]'.encode("latin-1"))
    assert main(["run", "--config", str(recipe(tmp_path, data, server.base_url))]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert "rows.json is not UTF-8: byte 0xef at byte offset 22" in caplog.text
    assert "unreadable rows: 1" in captured.out


def test_a_parquet_file_with_a_bad_row_group_keeps_every_other_row(tmp_path, server):
    paths = images(tmp_path / "imgs", 6)
    path = tmp_path / "rows.parquet"
    table = pa.table({"id": list(range(6)), "images": [[p] for p in paths], "text": [f"say: t{i}" for i in range(6)]})
    pq.write_table(table, path, row_group_size=2)
    meta = pq.ParquetFile(path).metadata.row_group(1).column(0)
    raw = bytearray(path.read_bytes())  # garble the second row group's first column chunk
    start = meta.data_page_offset
    raw[start : start + 24] = b"\xff" * 24
    path.write_bytes(bytes(raw))
    assert main(["-q", "run", "--config", str(recipe(tmp_path, path, server.base_url))]) == 0
    rows = export(tmp_path)
    assert len(rows) == 6
    assert [r.get("id") for r in rows] == [0, 1, None, None, 4, 5]
    assert [r[INVALID_ROW_KEY]["row"] for r in rows[2:4]] == [2, 3]
    assert "row group 1 cannot be read" in rows[2][INVALID_ROW_KEY]["error"]
    assert [r[META_KEY]["image_tags"] for r in rows if "id" in r] == [[["t0"]], [["t1"]], [["t4"]], [["t5"]]]
    assert stats(tmp_path)["unreadable_rows"] == 2


def test_a_huge_caption_is_cut_in_the_prompt_and_counted(tmp_path, server):
    paths = images(tmp_path / "imgs", 1)
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"images": paths, "text": "say: big " + "x" * 1_000_000}) + "\n")
    assert main(["-q", "run", "--config", str(recipe(tmp_path, data, server.base_url))]) == 0
    [seen] = server.requests
    assert len(user_text(seen.body)) < 4000 + 200  # the template's own words are extra
    assert export(tmp_path)[0][META_KEY]["image_tags"] == [["big"]]  # the 3,991-letter word is no tag
    assert stats(tmp_path)["prompts_cut"] == 1


def test_an_endpoint_that_refuses_connections_stops_the_run_after_one_round(tmp_path, capsys):
    with OpenAIServer() as gone:
        url = gone.base_url  # nothing listens there any more
    paths = images(tmp_path / "imgs", 5)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"images": [p]}) + "\n" for p in paths))
    assert main(["run", "--config", str(recipe(tmp_path, data, url))]) == 1
    out = capsys.readouterr().out
    host = url.split("//", 1)[1].split("/", 1)[0]
    assert f"run aborted: connection error: cannot connect to {host}" in out
    assert "no request of the first round reached the server: check the address" in out
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("size", [(1, 20_000), (20_000, 1)])
def test_an_image_beyond_the_models_aspect_ratio_costs_no_request(tmp_path, server, size):
    Image.new("RGB", size, (200, 30, 30)).save(tmp_path / "long.png")
    Image.new("RGB", (40, 30), (30, 30, 200)).save(tmp_path / "ok.png")
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"images": ["long.png", "ok.png"], "text": "say: fine"}) + "\n")
    assert main(["-q", "run", "--config", str(recipe(tmp_path, data, server.base_url))]) == 0
    [row] = export(tmp_path)
    assert row[META_KEY]["image_tags"] == [[], ["fine"]]
    assert row[META_KEY]["image_tags_errors"][0] == (
        f"aspect ratio 20,000:1 ({size[0]}x{size[1]}) is beyond the model's 200:1 (max_aspect_ratio); set "
        "pad_to_aspect: true to pad it instead")
    assert server.count == 1  # only the good image was sent

    server.reset()
    padded = recipe(tmp_path, data, server.base_url, pad_to_aspect=True)
    assert main(["-q", "run", "--config", str(padded)]) == 0
    [row] = export(tmp_path)
    assert row[META_KEY]["image_tags"] == [["fine"], ["fine"]] and row[META_KEY]["image_tags_errors"] == [None, None]
    sizes = [sent_size(r.body) for r in server.requests]
    [(w, h)] = [size for size in sizes if size != (40, 30)]
    assert max(w, h) / min(w, h) <= 200 and max(w, h) <= 20_000


def test_an_icc_profile_zlib_bomb_is_named_as_such(tmp_path, server):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "plain.png")
    png = (tmp_path / "plain.png").read_bytes()
    icc = b"prof\x00\x00" + zlib.compress(b"\x00" * (64 << 20), 9)
    (tmp_path / "bomb.png").write_bytes(png[:33] + chunk(b"iCCP", icc) + png[33:])  # after IHDR
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"images": ["bomb.png", "plain.png"], "text": "say: ok"}) + "\n")
    assert main(["-q", "run", "--config", str(recipe(tmp_path, data, server.base_url))]) == 0
    [row] = export(tmp_path)
    assert row[META_KEY]["image_tags_errors"][0] == (
        f"ICC profile too large ({len(icc):,} bytes compressed, past Pillow's safety limit when expanded): refused "
        "before decoding")
    assert row[META_KEY]["image_tags"] == [[], ["ok"]]


def test_eight_near_limit_pngs_in_one_batch_stay_under_the_memory_budget(tmp_path, server):
    """Eight 88-megapixel RGBA PNGs, 32 image threads: decodes share one memory budget (2 GiB by default), so
    the whole run's peak RSS, measured on the child process, stays under 2.5 GiB (it was 6.6 GiB without)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from p5_decode_memory import peak_rss, write_images

    write_images(tmp_path, 8)
    (tmp_path / "rows.jsonl").write_text("".join(
        json.dumps({"images": [f"big{i}.png"], "text": f"say: b{i}"}) + "\n" for i in range(8)))
    src = Path(__file__).resolve().parent.parent / "src"
    assert peak_rss(src, tmp_path, server.base_url) < 2.5
    rows = [json.loads(x) for x in (tmp_path / "out" / "o.jsonl").read_text().splitlines()]
    assert [r[META_KEY]["image_tags"] for r in rows] == [[[f"b{i}"]] for i in range(8)]
