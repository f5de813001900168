"""P5: memory stays flat however large the input.

A JSONL dataset of N rows (default 200,000) whose rows name 256 small images with a distinct text each (so
every row is a distinct request: the prompt is part of the cache key) runs through `vlmtag run` in a
subprocess against the zero-latency loopback server (tests/openai_server.py, its own process). The peak RSS of
the vlmtag process is sampled from /proc while the server counts answered requests; the peak reached by the
10,000th row and by the last row are printed, with their ratio.

Target: peak < 1 GiB and growth from 10k to 200k rows < 1.2x.

    .venv/bin/python benchmarks/p5_memory.py [--rows 200000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from openai_server import ServerProcess  # noqa: E402


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def write_api_job(folder: Path, rows: int, distinct_images: int, base_url: str) -> Path:
    """A JSONL dataset of `rows` rows (a distinct text each) naming `distinct_images` small PNGs, and a recipe
    tagging it through the API server at `base_url`; returns the recipe's path (the export: out/tagged.jsonl)."""
    (folder / "images").mkdir()
    for i in range(distinct_images):
        Image.new("RGB", (24, 24), (i % 256, 255 - i % 256, (i * 7) % 256)).save(folder / "images" / f"{i}.png")
    with open(folder / "data.jsonl", "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": i, "images": [f"images/{i % distinct_images}.png"], "text": f"row {i}"}) + "\n")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "dataset_path": str(folder / "data.jsonl"), "export_path": str(folder / "out" / "tagged.jsonl"),
        "process": [{"image_tagging_vlm_mapper": {
            "api_or_hf_model": "test-model", "is_api_model": True,
            "model_params": {"base_url": base_url, "api_key": "x"}}}],
    }))
    return recipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--checkpoint", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(decode=False) as server:
        folder = Path(tmp)
        recipe = write_api_job(folder, args.rows, 256, server.base_url)
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "vlmtag", "-q", "run", "--config", str(recipe)], cwd=ROOT)
        peak = peak_at_checkpoint = 0
        chunks = folder / "out" / ".vlmtag"
        while proc.poll() is None:
            peak = max(peak, rss_kib(proc.pid))
            if not peak_at_checkpoint:
                done = sum(1 for _ in chunks.rglob("*.jsonl")) * 256 if chunks.exists() else 0
                if done >= args.checkpoint:
                    peak_at_checkpoint = peak
            time.sleep(0.05)
        wall = time.perf_counter() - start
        assert proc.returncode == 0, proc.returncode
        out_rows = sum(1 for _ in open(folder / "out" / "tagged.jsonl"))
        assert out_rows == args.rows, out_rows
    print(f"rows: {args.rows:,}  wall: {wall:.1f} s  ({args.rows / wall:,.0f} rows/s)")
    print(f"peak RSS by row {args.checkpoint:,}: {peak_at_checkpoint / 1024:.0f} MiB")
    print(f"peak RSS by row {args.rows:,}: {peak / 1024:.0f} MiB")
    print(f"growth: {peak / max(peak_at_checkpoint, 1):.2f}x  (target < 1.2x, peak < 1024 MiB)")


if __name__ == "__main__":
    main()
