"""P3: the HF transformers engine on CPU, a batch of 8 images in one generate() vs the same 8 one at a time.

Same engine, same tiny random-weight model (built from a config, no download), same 8 requests, same run.
Rounds alternate (batched, one-at-a-time, batched, ...); the table shows the median and best round. Every
answer is exactly `--new-tokens` tokens long (min = max), so both ways do the same decoding work.

On a tiny model this mostly measures per-call overhead (processor, prefill, Python per decoding step), which
batching pays once per batch instead of once per image; benchmarks/gpu_hf.py is the real-model figure.

    .venv/bin/python benchmarks/p3_hf_batch.py [--model qwen2_5_vl|smolvlm] [--rounds 9] [--new-tokens 32]
        [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photo_requests(count: int, max_pixels: int):
    """`count` distinct requests from the scikit-image photos (each also mirrored), prepared like the op does."""
    import io

    from PIL import Image, ImageOps
    from skimage import data

    from vlmtag.engines import Request
    from vlmtag.images import prepare_image

    requests = []
    for i in range(count):
        im = Image.fromarray(getattr(data, PHOTOS[i % len(PHOTOS)])()).convert("RGB")
        if (i // len(PHOTOS)) % 2:
            im = ImageOps.mirror(im)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        image = prepare_image(buf.getvalue(), max_pixels=max_pixels)
        requests.append(Request(image=image, system_prompt="You tag images.", user_text=f"Tag this image ({i})."))
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("qwen2_5_vl", "smolvlm"), default="qwen2_5_vl")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--new-tokens", type=int, default=32)
    # The tiny models' processors work at <= 224x224; the op pre-resizes to that (its max_pixels), as a user
    # sets max_pixels to the model's own cap, so the processor has no resize left to do.
    parser.add_argument("--max-pixels", type=int, default=224 * 224)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    import torch

    from tiny_vlm import build_tiny_qwen2_5_vl, build_tiny_smolvlm
    from vlmtag.engines import EngineSettings, create_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    build = {"qwen2_5_vl": build_tiny_qwen2_5_vl, "smolvlm": build_tiny_smolvlm}[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp) / args.model)
        settings = EngineSettings(
            model=str(folder), kind="hf", max_pixels=args.max_pixels,
            model_params={"batch_size": args.batch},
            sampling_params={"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens},
        )
        engine = create_engine(settings)
        requests = photo_requests(args.batch, args.max_pixels)
        engine.generate(requests[:2])  # warm-up: first-call allocations and lazy imports

        batched, single = [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            responses = engine.generate(requests)
            batched.append(time.perf_counter() - t)
            assert all(r.ok and r.usage.completion_tokens == args.new_tokens for r in responses)
            t = time.perf_counter()
            for request in requests:
                assert engine.generate([request])[0].ok
            single.append(time.perf_counter() - t)
        engine.close()

    n = len(requests)
    med_b, med_s = statistics.median(batched), statistics.median(single)
    print(f"P3 HF engine, tiny random {args.model}, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{n} images at <= {args.max_pixels} px, {args.new_tokens} new tokens each, {args.rounds} rounds")
    print(f"{'way':<22}{'median s':>10}{'best s':>10}{'img/s (median)':>16}")
    print(f"{'batch of ' + str(args.batch):<22}{med_b:>10.3f}{min(batched):>10.3f}{n / med_b:>16.1f}")
    print(f"{'one at a time':<22}{med_s:>10.3f}{min(single):>10.3f}{n / med_s:>16.1f}")
    print(f"ratio (one-at-a-time / batched, medians): {med_s / med_b:.2f}x; best rounds: {min(single) / min(batched):.2f}x")


if __name__ == "__main__":
    main()
