"""Reading small local images while another thread keeps taking the GIL (as the API engine's thread does).

Every system call lets go of the GIL; with another thread runnable, taking it back is most of what reading a
small file costs. Compares vlmtag's local read (`read_source`: open, fstat, one read, close) with the same read
through a buffered file object (`open(path, "rb")`: eight calls), alternating, in one process, beside a thread
that polls epoll and runs a little Python in a loop. Prints µs per file for each and the ratio.

    .venv/bin/python benchmarks/read_contention.py [--files 2048] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import tempfile
import threading
import time

from vlmtag.images.fetch import read_source


def buffered(path: str) -> bytes:
    """The read as it was: a buffered file object, sized from fstat."""
    with open(path, "rb") as f:
        return f.read(os.fstat(f.fileno()).st_size + 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vlmtag-read-") as tmp:
        paths = []
        for i in range(args.files):
            paths.append(os.path.join(tmp, f"img_{i:05d}.jpg"))
            with open(paths[-1], "wb") as f:
                f.write(os.urandom(800 + i % 700))  # the size of P1's 32-64 px images
        stop = threading.Event()

        def busy() -> None:
            poller = select.epoll()
            while not stop.is_set():
                poller.poll(0)
                sum(range(300))

        threading.Thread(target=busy, daemon=True).start()
        best = {"vlmtag": float("inf"), "buffered": float("inf")}
        for _ in range(args.rounds):
            for name, read in (("vlmtag", read_source), ("buffered", buffered)):
                start = time.perf_counter()
                for path in paths:
                    read(path)
                best[name] = min(best[name], (time.perf_counter() - start) / len(paths) * 1e6)
        stop.set()
    print(f"{args.files} files of 0.8-1.5 KB, a busy thread beside, best of {args.rounds}, {os.cpu_count()} CPUs")
    print(f"vlmtag read_source: {best['vlmtag']:.1f} µs/file; buffered open: {best['buffered']:.1f} µs/file; "
          f"buffered / vlmtag = {best['buffered'] / best['vlmtag']:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
