"""Tiny random-weight vision-language models, built from a config on this machine (never downloaded).

`build_tiny_qwen2_5_vl(folder)` and `build_tiny_smolvlm(folder)` write a complete model folder (config,
~0.7 MB of weights, tokenizer, image processor, chat template) that `AutoModelForImageTextToText.from_pretrained`
and vlmtag's HF engine load like a real checkpoint. The text they write is gibberish: tests either constrain
decoding to the tags schema or check the flow. Used by the tests (a session fixture) and by benchmarks/p3_hf_batch.py.
`build_tiny_qwen2_5_vl_for_vllm(folder)` is a variant shaped for vLLM's CPU backend (tests/vllm, gpu_vllm.py).
"""

from __future__ import annotations

from pathlib import Path

# A few sentences for the byte-level BPE: enough for a vocabulary of ~800 with the JSON punctuation in it.
_CORPUS = [
    '{"tags": ["cat", "dog", "red-car", "city-street", "person", "coffee", "cup", "rocket", "sky"]}',
    "You are an image tagging assistant. Look at the image and give short English tags.",
    "Answer with JSON only, exactly in this form: tag-one, tag-two, reading, walking, blue, green.",
    "Tag this image. It came with this text: a photo of an astronaut, a cat on a mat, a cup of espresso.",
    "objects people colours materials visual style mood setting nouns gerunds lowercase hyphens",
    "0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p q r s t u v w x y z - _ [ ] { } \" : ,",
]

QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SMOL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                 "<global-img>"]
SMOL_IMAGE_SEQ_LEN = 4  # (image_size / patch_size)^2 / scale_factor^2 = (32/8)^2 / 2^2
SMOL_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _bpe_tokenizer(specials: list[str], vocab_size: int = 800):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def build_tiny_qwen2_5_vl(folder: str | Path, seed: int = 0) -> Path:
    """A ~180k-parameter Qwen2.5-VL with a 800-token BPE vocabulary, saved into `folder`."""
    return _build_qwen2_5_vl(
        folder, seed,
        text=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=4096, mrope_section=[2, 3, 3]),
        vision=dict(hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64),
    )


def build_tiny_qwen2_5_vl_for_vllm(folder: str | Path, seed: int = 0) -> Path:
    """The same tiny Qwen2.5-VL, shaped for vLLM's CPU backend (~0.5M parameters).

    vLLM's CPU attention supports head sizes 32, 64, 80, ... (16 fails with "Unsupported CPU attention
    configuration"): hidden 128 over 2 heads is head size 64, with 1 KV head and mrope sections summing to 32.
    `max_position_embeddings` must cover the `max_model_len` vlmtag asks for (>= 4096), so it is 32768.
    """
    return _build_qwen2_5_vl(
        folder, seed,
        text=dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=32768, mrope_section=[8, 12, 12]),
        vision=dict(hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128),
    )


def _build_qwen2_5_vl(folder: str | Path, seed: int, text: dict, vision: dict) -> Path:
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    folder = Path(folder)
    _seed(seed)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_tokenizer(QWEN_SPECIALS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIALS[1:],
    )
    fast.chat_template = QWEN_CHAT_TEMPLATE
    fast.padding_side = "left"
    ids = {t: fast.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(fast), hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
            num_hidden_layers=2, num_attention_heads=text["num_attention_heads"],
            num_key_value_heads=text["num_key_value_heads"], max_position_embeddings=text["max_position_embeddings"],
            rope_scaling={"type": "mrope", "mrope_section": text["mrope_section"]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=2, window_size=56, fullatt_block_indexes=[1], **vision),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=224 * 224).save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
    return folder


def build_tiny_smolvlm(folder: str | Path, seed: int = 0) -> Path:
    """A tiny SmolVLM (Idefics3 architecture) with a 800-token BPE vocabulary, saved into `folder`."""
    from transformers import (
        Idefics3ImageProcessor,
        Idefics3Processor,
        PreTrainedTokenizerFast,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )

    folder = Path(folder)
    _seed(seed)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_tokenizer(SMOL_SPECIALS),
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SMOL_SPECIALS[3:],
    )
    fast.chat_template = SMOL_CHAT_TEMPLATE
    fast.padding_side = "left"
    fast.model_input_names = ["input_ids", "attention_mask"]
    ids = {t: fast.convert_tokens_to_ids(t) for t in SMOL_SPECIALS}
    config = SmolVLMConfig(
        text_config=dict(
            model_type="llama", vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<end_of_utterance>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8,
        ),
        scale_factor=2,
        image_token_id=ids["<image>"],
        vocab_size=len(fast),
        pad_token_id=ids["<|endoftext|>"],
    )
    model = SmolVLMForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<end_of_utterance>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = ids["<|im_start|>"]
    model.save_pretrained(folder)
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32}
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=fast, image_seq_len=SMOL_IMAGE_SEQ_LEN,
        chat_template=SMOL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    return folder


if __name__ == "__main__":  # build both into a folder, for a look by hand
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-vlms")
    print(build_tiny_qwen2_5_vl(out / "qwen2_5_vl"), build_tiny_smolvlm(out / "smolvlm"))
