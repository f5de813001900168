"""Ray with an API engine: one work item per actor at a time vs two side by side, in the same run.

An actor with an API engine runs two items (batches) at once, as the local executor does, so that the next
batch's requests start while the slowest requests of the current one are still out. This measures what that
buys against a server whose answers take a varying time, as real VLM servers do.

The server (tests/openai_server.py, in this process) answers each image after a latency drawn once per image
from a uniform 0.05-0.6 s (the same for both variants). The dataset is distinct small PNGs; the recipe runs end
to end through `vlmtag.run.run_recipe` on Ray (`ray.init` once, not timed), cache off. Variants, rounds
interleaved, best of `--rounds`:

- 1 item per actor (`API_CALLS_PER_ACTOR = 1`, the executor before this change);
- 2 items per actor (the default).

The ideal: `np x concurrency` requests always in flight, i.e. images / (np x concurrency / mean latency).

    .venv/bin/python benchmarks/ray_api_overlap.py [--images 768] [--np 2] [--concurrency 8] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from openai_server import OpenAIServer, Reply  # noqa: E402

import vlmtag.executors.ray as ray_executor  # noqa: E402
from vlmtag.config import parse_recipe  # noqa: E402
from vlmtag.run import run_recipe  # noqa: E402

LOW, HIGH = 0.05, 0.6


def dataset(folder: Path, count: int) -> Path:
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(count):
        Image.new("RGB", (16 + i % 17, 16), (i % 251, (i * 7) % 253, 9)).save(folder / "images" / f"{i:05d}.png")
        rows.append({"images": [f"images/{i:05d}.png"], "text": f"image {i}"})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def latency(body: dict) -> float:
    """A latency per image, fixed by its request (so both variants wait the same)."""
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()
    return LOW + (HIGH - LOW) * int.from_bytes(digest[:4], "big") / 2**32


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=768)
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
    best: dict[int, float] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp, OpenAIServer(decode=False) as server:
            server.behaviour = lambda body, attempt: Reply.slow(latency(body), Reply.tags(["tag-a", "tag-b"]))
            data = dataset(Path(tmp), args.images)
            op = {"api_or_hf_model": "test-model", "is_api_model": True, "concurrency": args.concurrency,
                  "batch_size": args.batch_size, "model_params": {"base_url": server.base_url, "api_key": "x"}}
            for r in range(args.rounds):
                for calls in (1, 2):
                    ray_executor.API_CALLS_PER_ACTOR = calls
                    export = Path(tmp) / f"out-{r}-{calls}.jsonl"
                    recipe = parse_recipe({"dataset_path": str(data), "export_path": str(export), "use_cache": False,
                                           "executor_type": "ray", "np": args.np,
                                           "process": [{"image_tagging_vlm_mapper": op}]})
                    start = time.perf_counter()
                    result = run_recipe(recipe)
                    wall = time.perf_counter() - start
                    assert result.stats.tagged == args.images, result.stats
                    best[calls] = min(best.get(calls, wall), wall)
                    print(f"  round {r + 1}: {calls} item(s) per actor  {wall:6.2f} s", flush=True)
    finally:
        ray.shutdown()

    ideal = args.images / (args.np * args.concurrency / ((LOW + HIGH) / 2))
    print(f"\n{args.images} images, np={args.np} actors, concurrency {args.concurrency} per actor, batch size "
          f"{args.batch_size}, latency uniform {LOW}-{HIGH} s; {os.cpu_count()} CPUs; best of {args.rounds}\n")
    print("| items per actor | wall | ideal / wall |")
    print("|---|---:|---:|")
    for calls in (1, 2):
        print(f"| {calls} | {best[calls]:.2f} s | {ideal / best[calls]:.2f} |")
    print(f"\n2 items per actor vs 1: {best[1] / best[2]:.2f}x faster (ideal, excluding Ray start-up: {ideal:.2f} s)")


if __name__ == "__main__":
    main()
