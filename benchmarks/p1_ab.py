"""P1b's vlmtag run, from two source trees, alternating in fresh processes: is a change faster?

The machine's speed drifts more from minute to minute than most changes move it, so one tree's rate against
another's measured an hour apart means little. This runs P1b's recipe (benchmarks/p1_efficiency.py: 4,096
small images, a zero-latency server in its own process) with `src` from the baseline checkout and from this one,
one process after the other, each process a warm-up run and then `--runs` timed runs. Prints each tree's
median and best img/s, process CPU per image, and the ratios.

    git worktree add /tmp/vlmtag-base <rev>
    .venv/bin/python benchmarks/p1_ab.py --baseline /tmp/vlmtag-base [--rounds 5] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import p1_efficiency as p
import vlmtag
from openai_server import ServerProcess
assert vlmtag.__file__.startswith(sys.argv[2]), vlmtag.__file__
runs, images = int(sys.argv[3]), int(sys.argv[4])
with tempfile.TemporaryDirectory() as tmp:
    dataset = p.write_dataset(Path(tmp), images)
    rates, cpus = [], []
    with ServerProcess(decode=False) as server:
        for r in range(runs + 1):
            export = Path(tmp) / f"r{r}" / "out.jsonl"
            export.parent.mkdir()
            cpu = time.process_time()
            rate, tagged = p.vlmtag_rate(dataset, export, server.base_url, 32, 256)
            assert tagged == images, tagged
            rates.append(rate)
            cpus.append((time.process_time() - cpu) / images * 1e3)
print(json.dumps({"rates": rates[1:], "cpus": cpus[1:]}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, type=Path, help="a checkout of the revision to compare with")
    parser.add_argument("--rounds", type=int, default=5, help="processes per tree, alternating")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per process, after a warm-up run")
    parser.add_argument("--images", type=int, default=4096)
    args = parser.parse_args()
    trees = {"baseline": args.baseline.resolve(), "this": ROOT}
    found: dict[str, dict[str, list[float]]] = {name: {"rates": [], "cpus": []} for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            src = tree / "src"
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(ROOT / "benchmarks"), str(src), str(args.runs), str(args.images)],
                env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True, check=False)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            got = json.loads(done.stdout.splitlines()[-1])
            for key in found[name]:
                found[name][key] += got[key]
            print(f"{name:8s} img/s {[round(x) for x in got['rates']]}  CPU ms/img {[round(x, 3) for x in got['cpus']]}",
                  flush=True)
    med = {name: statistics.median(v["rates"]) for name, v in found.items()}
    best = {name: max(v["rates"]) for name, v in found.items()}
    cpu = {name: statistics.median(v["cpus"]) for name, v in found.items()}
    print(f"\n{args.rounds} processes per tree x {args.runs} runs, {args.images} images, {os.cpu_count()} CPUs")
    for name in trees:
        print(f"{name:8s} median {med[name]:.0f} img/s, best {best[name]:.0f}, CPU {cpu[name]:.3f} ms/img")
    print(f"this / baseline: median {med['this'] / med['baseline']:.3f}, best {best['this'] / best['baseline']:.3f}, "
          f"CPU per image {cpu['this'] / cpu['baseline']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
