"""P4 with vLLM: vlmtag's vLLM engine on real weights, a whole set of images in one LLM.chat vs one call per image.

For users with a CUDA GPU, vLLM (`pip install 'vlmtag[vllm]'`) and a Qwen2.5-VL checkpoint (a hub name they can
download, or a local folder). Same engine, same `vllm.LLM`, same run: first every image in ONE
`generate()` (one `LLM.chat(list_of_conversations)`), then one `generate()` per image (what Data-Juicer does).
Every answer is exactly `--new-tokens` tokens (min = max), greedy. Prints img/s for both, the ratio, the card
and the vLLM version. It has not been run by the vlmtag developers (no machine with vLLM and weights).

    python benchmarks/gpu_vllm.py --model Qwen/Qwen2.5-VL-7B-Instruct [--images 256] [--side 448]
        [--new-tokens 32] [--single-images 64] [--tp 1] [--json-schema]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_hf import make_vlmtag_importable, photo_crops  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct", help="hub name or local folder")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--side", type=int, default=448, help="image side in pixels (448 -> 256 visual tokens)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--single-images", type=int, default=64, help="images for the one-call-per-image run")
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--json-schema", action="store_true", help="constrain answers to the tags schema")
    args = parser.parse_args()

    make_vlmtag_importable()
    try:
        import vllm
    except ImportError:
        sys.exit("vLLM is not installed: pip install 'vlmtag[vllm]' (on a machine with a CUDA GPU)")
    import torch

    from vlmtag.engines.base import EngineSettings, Request
    from vlmtag.engines.vllm import VLLMEngine
    from vlmtag.images import EncodedImage
    from vlmtag.prompts import DEFAULT_INPUT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, fill_template
    from vlmtag.tags.schema import tags_json_schema

    max_pixels = args.side * args.side
    sampling = {"max_tokens": args.new_tokens}
    if not args.json_schema:  # constrained answers end at their closing brace: no fixed length then
        sampling["min_tokens"] = args.new_tokens
    settings = EngineSettings(
        model=args.model, kind="vllm", max_pixels=max_pixels, sampling_params=sampling,
        json_schema=tags_json_schema(10, 50) if args.json_schema else None,
        model_params={"tensor_parallel_size": args.tp, "gpu_memory_utilization": args.gpu_memory_utilization},
    )
    t = time.perf_counter()
    engine = VLLMEngine(settings)
    print(f"vLLM {vllm.__version__} started {args.model} in {time.perf_counter() - t:.0f} s")

    user_text = fill_template(DEFAULT_INPUT_TEMPLATE, "a photo")
    requests = [Request(image=EncodedImage(data=b, mime="image/jpeg", width=args.side, height=args.side),
                        system_prompt=DEFAULT_SYSTEM_PROMPT, user_text=user_text)
                for b in photo_crops(args.images, args.side)]
    engine.generate(requests[:8])  # warm-up

    t = time.perf_counter()
    batched = engine.generate(requests)
    batched_s = time.perf_counter() - t
    bad = [r.error for r in batched if not r.ok]
    assert not bad, bad[:3]
    single_requests = requests[: args.single_images]
    t = time.perf_counter()
    for request in single_requests:
        assert engine.generate([request])[0].ok
    single_s = time.perf_counter() - t

    batched_rate, single_rate = len(requests) / batched_s, len(single_requests) / single_s
    print(f"device: {torch.cuda.get_device_name()} x {args.tp}; {len(requests)} images at {args.side}x{args.side} px, "
          f"{statistics.mean(r.usage.prompt_tokens for r in batched):.0f} prompt tokens and "
          f"{statistics.mean(r.usage.completion_tokens for r in batched):.0f} new tokens each (greedy"
          f"{', json_schema' if args.json_schema else ''})")
    print(f"one LLM.chat for all:  {batched_rate:8.2f} img/s  ({batched_s:.1f} s for {len(requests)})")
    print(f"one call per image:    {single_rate:8.2f} img/s  ({single_s:.1f} s for {len(single_requests)})")
    print(f"ratio: {batched_rate / single_rate:.1f}x")
    engine.close()


if __name__ == "__main__":
    main()
