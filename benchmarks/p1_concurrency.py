"""P1 concurrency: does vlmtag keep a slow API busy?

The server (tests/openai_server.py, a separate process) takes 0.5 s per request and serves 32 at once, so no
client can tag more than 64 images/s. The dataset is 1,024 distinct small images (files on disk, a JSONL
dataset beside them). Compared in the same run:

- vlmtag, whole process: a recipe run end to end with default settings (`vlmtag.run.run_recipe`: read the
  JSONL, load and prepare each image, send, parse, checkpoint, cache, write the export JSONL), concurrency 32,
  in a fresh folder (empty answer cache). The clock runs from the call to its return.
- a Data-Juicer-style loop: one blocking request per image (the openai SDK when installed, else a sync httpx
  client), raw file bytes as a data URL, timed on the first 16 images.

Targets: vlmtag >= 0.85 of the server's limit and >= 27x the loop.

    .venv/bin/python benchmarks/p1_concurrency.py [--images 1024] [--latency 0.5] [--slots 32] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from openai_server import ServerProcess  # noqa: E402
from p1_efficiency import MODEL, vlmtag_rate, write_dataset  # noqa: E402  (same dataset and measurement)

from vlmtag.prompts import DEFAULT_INPUT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, fill_template  # noqa: E402

def data_juicer_loop_rate(dataset: Path, base_url: str, count: int) -> tuple[float, str]:
    """Images/s of one blocking request per image, the way Data-Juicer's operator sends them."""
    rows = [json.loads(line) for line in dataset.read_text().splitlines()[:count]]
    try:
        import openai

        client = openai.OpenAI(base_url=base_url, api_key="x")

        def ask(messages: list) -> str:
            return client.chat.completions.create(model=MODEL, messages=messages).choices[0].message.content

        how = "openai SDK"
    except ImportError:
        import httpx

        http = httpx.Client(base_url=base_url, headers={"Authorization": "Bearer x"}, timeout=120)

        def ask(messages: list) -> str:
            reply = http.post("/chat/completions", json={"model": MODEL, "messages": messages})
            return reply.json()["choices"][0]["message"]["content"]

        how = "sync httpx"
    start = time.perf_counter()
    for row in rows:
        for path in row["images"]:
            raw = (dataset.parent / path).read_bytes()
            url = "data:image/jpeg;base64," + base64.b64encode(raw).decode()
            messages = [
                {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": [
                    {"type": "text", "text": fill_template(DEFAULT_INPUT_TEMPLATE, row["text"])},
                    {"type": "image_url", "image_url": {"url": url}},
                ]},
            ]
            json.loads(ask(messages))
    return len(rows) / (time.perf_counter() - start), how


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--latency", type=float, default=0.5, help="server seconds per request")
    parser.add_argument("--slots", type=int, default=32, help="requests the server serves at once")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--loop-images", type=int, default=16)
    args = parser.parse_args()
    limit = args.slots / args.latency

    with tempfile.TemporaryDirectory(prefix="vlmtag-p1-") as tmp:
        dataset = write_dataset(Path(tmp), args.images)
        with ServerProcess(latency=args.latency, slots=args.slots) as server:
            loop_rate, how = data_juicer_loop_rate(dataset, server.base_url, args.loop_images)
            rate, tagged = vlmtag_rate(dataset, Path(tmp) / "out.jsonl", server.base_url,
                                       args.concurrency, args.batch_size)
        print(f"server: {args.latency:g} s per request, {args.slots} slots -> limit {limit:.1f} img/s "
              f"({server.summary})")
        print(f"{args.images} distinct {48}x{48} images, concurrency {args.concurrency}, "
              f"batch_size {args.batch_size}, {os.cpu_count()} CPUs\n")
        print("| client | images | img/s | vs limit | vs loop |")
        print("|---|---:|---:|---:|---:|")
        print(f"| vlmtag, recipe run end to end | {args.images} ({tagged} tagged) | {rate:.1f} | "
              f"{rate / limit:.2f} | {rate / loop_rate:.1f}x |")
        print(f"| Data-Juicer-style loop ({how}, 1 request at a time) | {args.loop_images} | {loop_rate:.2f} | "
              f"{loop_rate / limit:.3f} | 1.0x |")
        ok = rate >= 0.85 * limit and rate >= 27 * loop_rate and tagged == args.images
        print(f"\ntargets: >= 0.85 of the limit and >= 27x the loop, every image tagged: {'MET' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
