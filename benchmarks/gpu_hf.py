"""P4: the HF transformers engine on one GPU, Qwen2.5-VL-7B-Instruct's architecture, batched vs one image at a time.

No download and no weights: the model is built from Qwen2.5-VL-7B-Instruct's published configuration (embedded
below) with random weights created directly on the GPU in bf16. Real compute, meaningless text, so every answer
is exactly `--new-tokens` tokens (min = max). The tokenizer is a small byte-level BPE trained here (special
tokens at the ids the model expects); the image processor is Qwen2-VL's with its published settings. 256
distinct photo crops at 448x448 (256 visual tokens each) go through vlmtag's HF engine: once in batches of
`--batch`, once one image per generate() call, same engine, same run. Prints img/s for both, the ratio, the
batch size and the card's name.

    python benchmarks/gpu_hf.py [--images 256] [--batch 64] [--new-tokens 32] [--single-images 256]

Needs torch (CUDA), transformers and pillow; scikit-image for the photos (else synthetic images). vlmtag's
other dependencies need not be installed: when `import vlmtag` fails, only the engine modules are loaded
from src/ (they need nothing else). `--smoke` runs a shrunken model on CPU to check the script itself.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# Qwen/Qwen2.5-VL-7B-Instruct config.json (as published; the token ids are re-pointed at the BPE built here).
QWEN2_5_VL_7B_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}
# Its preprocessor_config.json (Qwen2VLImageProcessor).
QWEN2_5_VL_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
            "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's chat template, images and text parts only.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --------------------------------------------------------------------------------------------------
# vlmtag's engine, without the rest of vlmtag's dependencies.


def make_vlmtag_importable() -> None:
    """Put src/ on the path. `import vlmtag` and the HF engine need only the standard library, torch,
    transformers and Pillow (the image pipeline's OpenCV and simplejpeg load only when images are prepared), so
    this runs on a GPU machine with nothing else installed."""
    sys.path.insert(0, str(SRC))


# --------------------------------------------------------------------------------------------------
# The model, tokenizer, processor and photos.


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vlmtag.prompts import DEFAULT_INPUT_TEMPLATE, DEFAULT_SYSTEM_PROMPT

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [DEFAULT_SYSTEM_PROMPT, DEFAULT_INPUT_TEMPLATE, '{"tags": ["red-bicycle", "city-street", "reading"]}']
    bpe.train_from_iterator(corpus * 20, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=SPECIALS[1:])
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_config(tok, smoke: bool):
    from transformers import Qwen2_5_VLConfig

    raw = copy.deepcopy(QWEN2_5_VL_7B_CONFIG)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    raw.update(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
    )
    if smoke:  # the same architecture, shrunk so the script can be checked on a CPU
        raw.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_window_layers=2, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
        raw["vision_config"].update(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                                    fullatt_block_indexes=[1])
    vision = raw.pop("vision_config")
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                 "rope_scaling", "sliding_window", "use_sliding_window", "max_window_layers", "attention_dropout",
                 "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache")
    text = {k: raw[k] for k in text_keys if k in raw}
    ids = {k: v for k, v in raw.items() if k.endswith("_token_id")}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=raw["tie_word_embeddings"], **ids)


def build_model(config, device: str, dtype, attn: str):
    """Random weights created directly on `device` in `dtype` (no CPU copy, no checkpoint)."""
    import torch
    import transformers
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attn, **{dtype_key: dtype})
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval()


def write_processor_files(folder: Path, tok, config) -> None:
    """Config, tokenizer, image processor and chat template, as a model folder holds them (no weights): the
    engine loads the processor from here through its own path."""
    from transformers import Qwen2VLImageProcessor

    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessor(**QWEN2_5_VL_PREPROCESSOR).save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def photo_crops(count: int, side: int):
    """`count` distinct side x side JPEGs: crops, flips and scales of scikit-image's photos (else synthetic)."""
    import random

    from PIL import Image, ImageOps

    try:
        from skimage import data

        photos = [Image.fromarray(getattr(data, n)()).convert("RGB")
                  for n in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")]
    except Exception:  # noqa: BLE001 - no scikit-image: noise images cost the model the same
        import numpy as np

        rng = np.random.default_rng(0)
        photos = [Image.fromarray(rng.integers(0, 255, (512, 640, 3), dtype=np.uint8)) for _ in range(6)]
    rng = random.Random(0)
    out = []
    for i in range(count):
        im = photos[i % len(photos)]
        scale = rng.uniform(0.6, 1.0)
        w, h = int(im.width * scale), int(im.height * scale)
        x, y = rng.randint(0, im.width - w), rng.randint(0, im.height - h)
        crop = im.crop((x, y, x + w, y + h)).resize((side, side), Image.BICUBIC)
        if i % 2:
            crop = ImageOps.mirror(crop)
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="images per generate() in the batched run")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--side", type=int, default=448, help="image side in pixels (448 -> 256 visual tokens)")
    parser.add_argument("--single-images", type=int, default=None,
                        help="images for the one-at-a-time run (default: all); its img/s is what is compared")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, flash_attention_2, eager)")
    parser.add_argument("--smoke", action="store_true", help="a shrunken model on CPU, to check the script")
    args = parser.parse_args()

    import torch
    import transformers

    make_vlmtag_importable()
    from vlmtag.engines.base import EngineSettings, Request
    from vlmtag.engines.hf import HFEngine
    from vlmtag.images import EncodedImage
    from vlmtag.prompts import DEFAULT_INPUT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, fill_template

    system_prompt, user_text = DEFAULT_SYSTEM_PROMPT, fill_template(DEFAULT_INPUT_TEMPLATE, "a photo")
    if args.smoke:
        device, dtype, name = "cpu", torch.float32, "CPU (smoke run, shrunken model)"
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU visible (use --smoke to check the script on a CPU)")
        device, dtype, name = "cuda", torch.bfloat16, torch.cuda.get_device_name()

    tok = build_tokenizer()
    t = time.perf_counter()
    config = build_config(tok, args.smoke)
    model = build_model(config, device, dtype, args.attn)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: Qwen2.5-VL-7B-Instruct architecture, {params / 1e9:.2f} B parameters, random {dtype}, "
          f"built on {device} in {time.perf_counter() - t:.1f} s; attention: {args.attn}")

    images = [EncodedImage(data=b, mime="image/jpeg", width=args.side, height=args.side)
              for b in photo_crops(args.images, args.side)]
    requests = [Request(image=im, system_prompt=system_prompt, user_text=user_text) for im in images]
    with tempfile.TemporaryDirectory() as tmp:
        write_processor_files(Path(tmp), tok, config)
        settings = EngineSettings(
            model=tmp, kind="hf", max_pixels=args.side * args.side,
            model_params={"batch_size": args.batch},
            sampling_params={"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens},
        )
        engine = HFEngine(settings, model=model)

        def sync() -> None:
            if device == "cuda":
                torch.cuda.synchronize()

        engine.generate(requests[: min(args.batch, len(requests))])  # warm-up: kernels, allocator
        engine.generate(requests[:1])
        sync()

        t = time.perf_counter()
        batched = engine.generate(requests)
        sync()
        batched_s = time.perf_counter() - t
        bad = [r.error for r in batched if not r.ok]
        assert not bad, bad[:3]
        assert all(r.usage.completion_tokens == args.new_tokens for r in batched)
        prompt_tokens = statistics.mean(r.usage.prompt_tokens for r in batched)

        single_requests = requests[: args.single_images or len(requests)]
        t = time.perf_counter()
        for request in single_requests:
            response = engine.generate([request])[0]
            assert response.ok, response.error
        sync()
        single_s = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0

    batched_rate = len(requests) / batched_s
    single_rate = len(single_requests) / single_s
    print(f"device: {name}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{len(requests)} images at {args.side}x{args.side} px, {prompt_tokens:.0f} prompt tokens each "
          f"(image + vlmtag's default prompts), {args.new_tokens} new tokens each, greedy")
    print(f"batched (batch size {args.batch}): {batched_rate:8.2f} img/s  ({batched_s:.1f} s for {len(requests)})")
    print(f"one at a time:            {single_rate:8.2f} img/s  ({single_s:.1f} s for {len(single_requests)})")
    print(f"ratio: {batched_rate / single_rate:.1f}x; peak GPU memory {peak:.1f} GiB")


if __name__ == "__main__":
    main()
