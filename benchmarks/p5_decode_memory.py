"""P5b — peak memory of a batch of huge images: eight 88-megapixel RGBA PNGs (9,400 x 9,400, just under the
decompression-bomb limit, 1.6 MB each on disk) in one batch, `image_workers: 32`, through a whole `vlmtag run`
against the loopback server. Printed: the child process's peak RSS, for this tree and, with `--baseline REV`, for
an earlier commit (checked out into a temporary worktree, same Python and packages).

    .venv/bin/python benchmarks/p5_decode_memory.py --baseline 6c53948
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from openai_server import OpenAIServer, say  # noqa: E402

SIDE = 9_400


def write_images(folder: Path, n: int) -> None:
    ramp = np.linspace(0, 255, SIDE, dtype=np.uint8)
    pixels = np.empty((SIDE, SIDE, 4), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2], pixels[..., 3] = ramp[None, :], ramp[:, None], 128, 200
    Image.fromarray(pixels, "RGBA").save(folder / "big0.png", compress_level=1)
    for i in range(1, n):
        shutil.copy(folder / "big0.png", folder / f"big{i}.png")


def peak_rss(src: Path, folder: Path, base_url: str) -> float:
    """GiB: the peak RSS of one `vlmtag run` child over the eight images."""
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "dataset_path": str(folder / "rows.jsonl"), "export_path": str(folder / "out" / "o.jsonl"), "use_cache": False,
        "process": [{"image_tagging_vlm_mapper": {"api_or_hf_model": "m", "is_api_model": True, "image_workers": 32,
                                                  "model_params": {"base_url": base_url, "api_key": "k"}}}]}))
    shutil.rmtree(folder / "out", ignore_errors=True)
    code = f"import sys; sys.path.insert(0, {str(src)!r}); from vlmtag.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", code, "-q", "run", "--config", str(recipe)])
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return usage.ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", help="a git commit to measure too")
    p.add_argument("--images", type=int, default=8)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, OpenAIServer(decode=False) as server:
        server.behaviour = say
        folder = Path(tmp)
        write_images(folder, args.images)
        (folder / "rows.jsonl").write_text("".join(
            json.dumps({"images": [f"big{i}.png"], "text": f"say: b{i}"}) + "\n" for i in range(args.images)))
        sides = {"this tree": ROOT / "src"}
        if args.baseline:
            base = folder / "base"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base), args.baseline],
                           check=True)
            sides = {"baseline": base / "src", **sides}
        try:
            for name, src in sides.items():
                print(f"{name:10} peak RSS {peak_rss(src, folder, server.base_url):5.2f} GiB", flush=True)
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder / "base")])
    print(f"({resource.getpagesize()} B pages; {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
