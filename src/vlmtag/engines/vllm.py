"""vLLM engine: one `vllm.LLM` per process, a whole batch of images in ONE `LLM.chat(...)` call.

vLLM schedules the conversations of that call itself (continuous batching), so the GPU stays full; Data-Juicer
sent one `chat()` per image. Images arrive already downscaled to the op's `max_pixels`, and the same cap goes
to the model's processor (`mm_processor_kwargs.max_pixels`), so vLLM neither reserves memory for huge images
nor spends CPU resizing them again.

`model_params` go to `vllm.LLM(...)` as they are (`tensor_parallel_size`, `max_model_len`,
`gpu_memory_utilization`, `limit_mm_per_prompt`, `mm_processor_kwargs`, `dtype`, `quantization`, ...), with
defaults for what a tagging run needs: one image per prompt, `max_pixels` from the op, and a `max_model_len`
that fits one image plus prompt and answer (not the model's 128k, whose KV cache may not fit).

`sampling_params` map onto `vllm.SamplingParams`: greedy (`temperature=0`) unless sampling is asked for,
`max_tokens` 256 unless given (`max_new_tokens` is read too), structured output through
`StructuredOutputsParams(json=schema)` on vLLM >= 0.12, `GuidedDecodingParams(json=schema)` before.

The request and parameter building are the pure functions below (tested without vLLM or a GPU); vLLM itself is
imported only when the engine is built (extra `vlmtag[vllm]`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import re
import threading
from typing import Any, Mapping, Sequence

from vlmtag.engines.base import Engine, EngineError, EngineSettings, Request, Response, Usage, chat_messages
from vlmtag.engines.hub import ModelNotFound, resolve_model
from vlmtag.engines.sampling import answer_budget, wants_sampling

log = logging.getLogger(__name__)

#: Qwen-VL models spend one visual token per 28x28 pixels.
PIXELS_PER_TOKEN = 28 * 28
#: Prompt (system + template + text) and answer, on top of the image's tokens.
TEXT_TOKENS_ALLOWANCE = 2048
MIN_MAX_MODEL_LEN = 4096
#: The first vLLM whose SamplingParams take `structured_outputs=` (and no longer `guided_decoding=`).
STRUCTURED_OUTPUTS_SINCE = (0, 12)
#: Transformers-style sampling keys that SamplingParams knows under another name (or not at all).
_RENAMED = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
_DROPPED = frozenset({"do_sample", "num_beams", "no_repeat_ngram_size", "typical_p", "length_penalty"})


# --------------------------------------------------------------------------------------------------
# Pure functions.


def build_conversation(request: Request) -> list[dict[str, Any]]:
    """One image's chat, in the OpenAI message format `LLM.chat` reads (same as the API engine sends)."""
    return chat_messages(request)


def default_max_model_len(max_pixels: int, max_tokens: int) -> int:
    """Context for one image of `max_pixels`, the prompt and the answer, rounded up to 1024 (at least 4096)."""
    needed = math.ceil(max_pixels / PIXELS_PER_TOKEN) + TEXT_TOKENS_ALLOWANCE + max_tokens
    return max(MIN_MAX_MODEL_LEN, math.ceil(needed / 1024) * 1024)


def llm_kwargs(settings: EngineSettings, model: str | None = None) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)`: every `model_params` entry, plus tagging defaults.

    Defaults (each only when not given): `limit_mm_per_prompt={"image": 1}`, `mm_processor_kwargs.max_pixels`
    = the op's `max_pixels`, `max_model_len` from `default_max_model_len`. `tensor_parallel_size` and the rest
    pass through unchanged.
    """
    kwargs = dict(settings.model_params)
    kwargs.pop("batch_size", None)  # an HF engine option; vLLM schedules its own batches
    kwargs["model"] = model or kwargs.get("model") or settings.model
    kwargs.setdefault("limit_mm_per_prompt", {"image": 1})
    mm = dict(kwargs.get("mm_processor_kwargs") or {})
    mm.setdefault("max_pixels", settings.max_pixels)
    kwargs["mm_processor_kwargs"] = mm
    kwargs.setdefault(
        "max_model_len", default_max_model_len(settings.max_pixels, answer_budget(settings.sampling_params))
    )
    return kwargs


def sampling_kwargs(settings: EngineSettings) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(`SamplingParams` keyword arguments, structured-output arguments or None).

    Greedy (`temperature=0.0`) unless `wants_sampling`; `max_tokens` from `max_tokens`/`max_new_tokens` (256
    by default); `min_new_tokens` becomes `min_tokens`; transformers-only keys (`do_sample`, `num_beams`, ...)
    are dropped; everything else passes through to SamplingParams (which rejects what it does not know).
    The structured-output arguments are `{"json": schema, "disable_any_whitespace": True}` when the op has a
    schema: no free whitespace, so a greedy model cannot spend its budget on newlines.
    """
    params = settings.sampling_params
    kwargs: dict[str, Any] = {}
    for key, value in params.items():
        if value is None or key in _DROPPED or key in ("max_tokens", "max_new_tokens"):
            continue
        kwargs[_RENAMED.get(key, key)] = value
    kwargs["max_tokens"] = answer_budget(params)
    if not wants_sampling(params):
        kwargs["temperature"] = 0.0
    structured = None
    if settings.json_schema:
        structured = {"json": settings.json_schema, "disable_any_whitespace": True}
    return kwargs, structured


def _version_tuple(version: str) -> tuple[int, int]:
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    if not match:
        raise ValueError(f"unreadable vLLM version {version!r}")
    return int(match.group(1)), int(match.group(2))


def structured_output_field(vllm_version: str) -> str:
    """`structured_outputs` on vLLM >= 0.12, `guided_decoding` before (the guided_* API was removed in 0.12)."""
    return "structured_outputs" if _version_tuple(vllm_version) >= STRUCTURED_OUTPUTS_SINCE else "guided_decoding"


def accepted_fields(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `values` that dataclass `cls` has fields for (older vLLM lacks some options)."""
    try:
        names = {f.name for f in dataclasses.fields(cls)}
    except TypeError:
        return dict(values)
    return {k: v for k, v in values.items() if k in names}


def response_from_output(output: Any) -> Response:
    """A `Response` from one `vllm.RequestOutput` (text and token counts; an empty completion is an error)."""
    completions = getattr(output, "outputs", None) or []
    prompt_tokens = len(getattr(output, "prompt_token_ids", None) or [])
    if not completions:
        return Response(error="vLLM returned no completion", retryable=True, usage=Usage(prompt_tokens=prompt_tokens))
    first = completions[0]
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=len(getattr(first, "token_ids", None) or []))
    return Response(text=(first.text or "").strip(), usage=usage)


# --------------------------------------------------------------------------------------------------
# The engine (imports vLLM).


class VLLMEngine(Engine):
    """Local inference with vLLM on CUDA GPUs."""

    kind = "vllm"

    def __init__(self, settings: EngineSettings) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise EngineError(
                "the vllm engine needs vLLM: pip install 'vlmtag[vllm]' on a machine with a CUDA GPU "
                "(or use engine: hf, or an API model with is_api_model: true)"
            )
        try:
            model = resolve_model(settings.model, settings.model_params)
        except ModelNotFound as e:
            raise EngineError(str(e)) from None
        import vllm
        from vllm import LLM, SamplingParams

        self.settings = settings
        self._lock = threading.Lock()
        kwargs, structured = sampling_kwargs(settings)
        if structured is not None:
            field = structured_output_field(vllm.__version__)
            if field == "structured_outputs":
                from vllm.sampling_params import StructuredOutputsParams as Structured
            else:
                from vllm.sampling_params import GuidedDecodingParams as Structured
            kwargs[field] = Structured(**accepted_fields(Structured, structured))
        try:
            self._sampling = SamplingParams(**kwargs)
        except Exception as e:  # noqa: BLE001 - unknown or invalid sampling_params
            raise EngineError(f"sampling_params not accepted by vLLM {vllm.__version__}: {e}") from None
        try:
            self._llm = LLM(**llm_kwargs(settings, model))
        except Exception as e:  # noqa: BLE001 - one line at build time, whatever vLLM raised
            raise EngineError(f"cannot start vLLM for {settings.model!r}: {type(e).__name__}: {e}") from None

    def generate(self, requests: Sequence[Request]) -> list[Response]:
        if not requests:
            return []
        with self._lock:  # LLM is not thread-safe; one call already keeps the GPU busy
            return self._chat(list(requests))

    def _chat(self, requests: list[Request]) -> list[Response]:
        try:
            outputs = self._llm.chat([build_conversation(r) for r in requests], self._sampling, use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - one bad image must not fail the batch: isolate it
            if len(requests) == 1:
                return [Response(error=f"vLLM failed: {type(e).__name__}: {e}")]
            log.warning("vLLM failed on a batch of %d (%s); retrying one by one", len(requests), e)
            return [self._chat([r])[0] for r in requests]
        if len(outputs) != len(requests):
            return [Response(error=f"vLLM returned {len(outputs)} outputs for {len(requests)} requests", retryable=True)
                    for _ in requests]
        return [response_from_output(o) for o in outputs]

    def close(self) -> None:
        with self._lock:
            self._llm = None
