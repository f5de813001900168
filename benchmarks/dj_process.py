"""Inside Data-Juicer: the same recipe under `dj-process` twice, once with Data-Juicer's own
`image_tagging_vlm_mapper`, once with vlmtag's implementation (`VLMTAG_REPLACE_DJ_TAGGER=1`, recipe unchanged).

Runs in the Data-Juicer tier's environment (`make test-dj` builds it):

    .venv-dj/bin/python benchmarks/dj_process.py [--images 200] [--latency 0.2] [--np 1]

The recipe: `text_length_filter` (keeps every row) → the tagger (`is_api_model: true`, nothing else set) →
`remove_specific_chars_mapper`. The server is the loopback OpenAI server (tests/openai_server.py, in this process,
`--latency` seconds per answer). It stands for a model that:

- answers each image's own tags (`item-<n>`, `shade-<n % 7>`, `group-<n // 10>`), read from the image's size;
- puts prose around the JSON for 3 images in 10 ("Sure! Here are the tags: {...} Hope this helps.");
- sees a broken image when the declared MIME type is not the bytes' format (a PNG sent as `image/jpeg`), and
  answers `unreadable-image`.

The dataset: `--images` distinct images (every fourth a PNG) on disk; most rows hold one image, 8 rows repeat a
path (`[a, b, a]`), 2 rows start with a missing image (`[missing, c]`).

Per run: img/s (distinct images / the operator's time as Data-Juicer logs it, "OP [...] Done in"), and the wall
time of the whole `dj-process`; correct tag lists out of all image slots (an existing image: exactly its tags, as
a set; a missing one: no tags and an error recorded); what went wrong without a word: wrong tags, empty tag lists
with no error, rows whose tag lists do not line up with their images (a different count), rows dropped; and the
requests the server got. Target: vlmtag >= 10x Data-Juicer's op in img/s.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from openai_server import OpenAIServer, Reply, tags_content  # noqa: E402

DJ_PROCESS = str(Path(sys.executable).with_name("dj-process"))
MAGIC = {"image/png": b"\x89PNG", "image/jpeg": b"\xff\xd8"}


def image_id(width: int, height: int) -> int:
    return (width - 40) + 100 * (height - 30)


def expected_tags(n: int) -> list[str]:
    return [f"item-{n}", f"shade-{n % 7}", f"group-{n // 10}"]


def model(body: dict, attempt: int) -> Reply:
    """The stand-in model (see the module docstring)."""
    url = next(part["image_url"]["url"] for part in body["messages"][-1]["content"] if part["type"] == "image_url")
    mime, data = url[len("data:"):url.index(";")], base64.b64decode(url[url.index(",") + 1:])
    if not data.startswith(MAGIC.get(mime, b"?")):
        return Reply.tags(["unreadable-image"])
    with Image.open(io.BytesIO(data)) as im:
        n = image_id(*im.size)
    if n % 10 < 3:
        return Reply.text(f"Sure! Here are the tags: {tags_content(expected_tags(n))} Hope this helps.")
    return Reply.tags(expected_tags(n))


def write_dataset(folder: Path, count: int) -> list[dict]:
    """`count` distinct images (their size encodes their number) and the rows described in the docstring."""
    (folder / "images").mkdir(parents=True)
    names = []
    for n in range(count):
        name = f"images/{n:04d}.png" if n % 4 == 0 else f"images/{n:04d}.jpg"
        size = (40 + n % 100, 30 + n // 100)
        Image.new("RGB", size, ((n * 53) % 256, (n * 97) % 256, 120)).save(folder / name)
        names.append(name)
    singles, repeats, tail = names[: count - 18], names[count - 18 : count - 2], names[count - 2 :]
    rows = [{"images": [p]} for p in singles]
    rows += [{"images": [a, b, a]} for a, b in zip(repeats[::2], repeats[1::2])]
    rows += [{"images": ["images/missing.jpg", p]} for p in tail]
    for i, row in enumerate(rows):
        row["text"] = f"<__dj__image> photo number {i} #bench"
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def recipe(folder: Path, base_url: str, np_: int) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "project_name": "dj-bench",
        "dataset_path": str(folder / "data.jsonl"),
        "export_path": str(folder / "out" / "tagged.jsonl"),
        "np": np_,
        "use_cache": False,
        "keep_stats_in_res_ds": True,
        "process": [
            {"text_length_filter": {"min_len": 1}},
            {"image_tagging_vlm_mapper": {"api_or_hf_model": "test-model", "is_api_model": True,
                                          "model_params": {"base_url": base_url, "api_key": "sk-bench"}}},
            {"remove_specific_chars_mapper": {"chars_to_remove": "#"}},
        ],
    }))
    return path


def run(folder: Path, base_url: str, np_: int, *, vlmtag: bool) -> dict:
    env = dict(os.environ, UV_OFFLINE="1", PIP_NO_INDEX="1", XDG_CACHE_HOME=str(folder / "xdg-cache"),
               HF_HOME=str(folder / "hf"))
    env.pop("VLMTAG_REPLACE_DJ_TAGGER", None)
    if vlmtag:
        env["VLMTAG_REPLACE_DJ_TAGGER"] = "1"  # the same recipe file, vlmtag's implementation
    start = time.perf_counter()
    proc = subprocess.run([DJ_PROCESS, "--config", str(recipe(folder, base_url, np_))], capture_output=True,
                          text=True, env=env, cwd=folder, check=False)
    wall = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"dj-process failed:\n{log[-4000:]}")
    op_time = float(re.search(r"OP \[image_tagging_vlm_mapper\] Done in ([0-9.]+)s", log).group(1))
    return {"wall": wall, "op": op_time, "installs": "using uv" in log}


def score(folder: Path, rows: list[dict]) -> dict:
    """Correct tag lists over all image slots, and the silent failures (see the module docstring)."""
    out = [json.loads(line) for line in (folder / "out" / "tagged.jsonl").read_text().splitlines()]
    by_text = {r["text"]: r for r in out}
    s = {"slots": 0, "correct": 0, "wrong": 0, "silent_empty": 0, "misaligned_rows": 0, "dropped_rows": 0}
    for row in rows:
        got = by_text.get(row["text"].replace("#", ""))
        s["slots"] += len(row["images"])
        if got is None:
            s["dropped_rows"] += 1
            continue
        meta = got["__dj__meta__"]
        tags = meta.get("image_tags") or []
        errors = meta.get("image_tags_errors") or [None] * len(tags)
        if len(tags) != len(row["images"]):  # tag lists no longer line up with the images
            s["misaligned_rows"] += 1
        for j, path in enumerate(row["images"]):
            t = tags[j] if j < len(tags) else None
            e = errors[j] if j < len(errors) else None
            if "missing" in path:
                ok = t == [] and bool(e)
            else:
                with Image.open(folder / path) as im:
                    ok = t is not None and set(t) == set(expected_tags(image_id(*im.size)))
                s["silent_empty"] += t == [] and not e
                s["wrong"] += bool(t) and not ok
            s["correct"] += ok
    return s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--np", type=int, default=1, dest="np_")
    args = parser.parse_args(argv)
    results = {}
    with OpenAIServer(latency=args.latency, record=False) as server:
        server.behaviour = model
        for name, vlmtag in (("Data-Juicer's image_tagging_vlm_mapper", False), ("vlmtag (same recipe)", True)):
            with tempfile.TemporaryDirectory(prefix="dj-bench-") as tmp:
                folder = Path(tmp)
                rows = write_dataset(folder, args.images)
                server.reset()
                r = run(folder, server.base_url, args.np_, vlmtag=vlmtag)
                r.update(score(folder, rows), requests=server.count)
                results[name] = r
    print(f"dj-process, {args.images} images, server {args.latency} s per answer, np={args.np_}")
    print(f"{'':40} {'img/s (op)':>10} {'op s':>6} {'wall s':>6} {'correct':>9} {'wrong':>5} {'silent []':>9} "
          f"{'misaligned':>10} {'dropped':>7} {'requests':>8}")
    for name, r in results.items():
        print(f"{name:40} {args.images / r['op']:>10.1f} {r['op']:>6.2f} {r['wall']:>6.1f} "
              f"{r['correct']:>4}/{r['slots']:<4} {r['wrong']:>5} {r['silent_empty']:>9} {r['misaligned_rows']:>10} "
              f"{r['dropped_rows']:>7} {r['requests']:>8}" + ("  (installed packages at run time!)"
                                                              if r["installs"] else ""))
    dj, vt = results.values()
    print(f"vlmtag / Data-Juicer: {dj['op'] / vt['op']:.1f}x img/s (target >= 10x)")


if __name__ == "__main__":
    main()
