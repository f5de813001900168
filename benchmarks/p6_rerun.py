"""P6: rerunning a job costs almost nothing.

A 100,000-row job runs once against the zero-latency loopback server. Then, in the same run:

- rerun of the finished job (the normal case: the export and its `complete.json` exist);
- rerun of a job whose every batch is checkpointed but not yet merged (a crash right before the end): all
  input rows are read and skipped, and the chunks are merged into the export.

Both reruns send no request. Printed: rows/s for each (rows / wall time of the whole `vlmtag run` process,
Python start-up included).

Target: >= 5,000 rows/s.

    .venv/bin/python benchmarks/p6_rerun.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from openai_server import ServerProcess  # noqa: E402
from p5_memory import write_api_job  # noqa: E402  (benchmarks/ is on the path when a script in it runs)


def run(recipe: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vlmtag", "-q", "run", "--config", str(recipe)], cwd=ROOT, check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(decode=False) as server:
        folder = Path(tmp)
        recipe = write_api_job(folder, args.rows, 64, server.base_url)
        first = run(recipe)
        finished = run(recipe)
        # Simulate a crash right before the merge: put the chunks back, drop the marker and the export.
        job = next((folder / "out" / ".vlmtag" / "jobs").iterdir())
        (job / "complete.json").unlink()
        (job / "chunks").mkdir(exist_ok=True)
        out = folder / "out" / "tagged.jsonl"
        rows = [json.loads(line) for line in out.open()]
        for b in range(0, len(rows), 256):
            with open(job / "chunks" / f"00000-{b // 256:08d}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows[b : b + 256])
        del rows
        out.unlink()
        unmerged = run(recipe)
        assert sum(1 for _ in out.open()) == args.rows
    print(f"first run: {args.rows:,} rows in {first:.1f} s ({args.rows / first:,.0f} rows/s)")
    print(f"rerun, finished job: {finished:.2f} s ({args.rows / finished:,.0f} rows/s)")
    print(f"rerun, all batches checkpointed, not merged: {unmerged:.2f} s ({args.rows / unmerged:,.0f} rows/s)")


if __name__ == "__main__":
    main()
