"""Start-up cost: `vlmtag --help` and `import vlmtag.tags`, whole processes, this tree against a baseline commit.

The baseline is checked out with `git worktree` into a temporary folder and imported from there by the same
Python (`PYTHONPATH`), so both sides share every installed package. Rounds alternate; best of N per side.

    .venv/bin/python benchmarks/startup.py --baseline 6c53948 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "vlmtag --help": ["-m", "vlmtag", "--help"],
    "import vlmtag.tags": ["-c", "import vlmtag.tags"],
    "import vlmtag": ["-c", "import vlmtag"],
}


def timed(src: Path, args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="git commit to compare with")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base), args.baseline],
                       check=True)
        try:
            sides = {"baseline": base / "src", "this tree": ROOT / "src"}
            for src in sides.values():  # warm the bytecode caches
                for case in CASES.values():
                    timed(src, case)
            best: dict[tuple[str, str], float] = {}
            for _ in range(args.rounds):
                for name, case in CASES.items():
                    for side, src in sides.items():
                        t = timed(src, case)
                        best[name, side] = min(best.get((name, side), t), t)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=True)
    print(f"{'':22} {'baseline':>10} {'this tree':>10} {'ratio':>7}   (best of {args.rounds}, seconds)")
    for name in CASES:
        b, t = best[name, "baseline"], best[name, "this tree"]
        print(f"{name:22} {b:10.3f} {t:10.3f} {t / b:7.2f}")


if __name__ == "__main__":
    main()
