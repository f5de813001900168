"""Hugging Face transformers engine: `AutoModelForImageTextToText` + its processor, batched `generate()`.

A `generate` call tags its whole list of requests in batches of `model_params.batch_size` images (default 8
on CPU, 32 on a GPU), left-padded, greedy unless `sampling_params` ask for sampling, at most
`max_new_tokens` (default 256) new tokens each. Requests are sorted by image size first, so that a batch holds
images of similar token counts and little padding; the answers come back in the caller's order.

Structured output: with `settings.json_schema` set, xgrammar constrains every answer to that schema (compiled
once, without free whitespace; a new logits processor per `generate()`, because it holds state), and special
tokens other than EOS are suppressed (xgrammar would let them into strings otherwise).

Works without torchvision: when `AutoProcessor` cannot build the processor (Qwen2-VL / Qwen2.5-VL insist on a
video processor, and theirs needs torchvision) or returns a bare tokenizer, the processor is assembled from
`AutoImageProcessor` + `AutoTokenizer` + an images-only video-processor stand-in.

torch, transformers and xgrammar are imported when an engine is built, never by `import vlmtag`.

`model_params`: `batch_size` (images per `generate()`), `device_map` (default: "cuda" when a GPU is visible,
else "cpu"), `dtype` / `torch_dtype` (default: "auto" on a GPU, float32 on CPU); everything else goes to
`from_pretrained` as is (`attn_implementation`, `revision`, `trust_remote_code`, ...).
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import threading
from typing import Any, Mapping, Sequence

from vlmtag.engines.base import Engine, EngineError, EngineSettings, Request, Response, Usage
from vlmtag.engines.hub import ModelNotFound, resolve_model
from vlmtag.engines.sampling import answer_budget, wants_sampling

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE_CPU = 8
DEFAULT_BATCH_SIZE_GPU = 32
#: model_params keys the engine uses itself; the rest go to `from_pretrained`.
ENGINE_PARAMS = frozenset({"batch_size"})
#: sampling_params keys passed to `generate()` only when sampling.
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "typical_p")
#: sampling_params keys passed to `generate()` as they are.
GENERATE_KEYS = frozenset(
    {"repetition_penalty", "no_repeat_ngram_size", "num_beams", "length_penalty", "min_new_tokens",
     "bad_words_ids", "encoder_repetition_penalty", "epsilon_cutoff", "eta_cutoff", "renormalize_logits",
     "num_beam_groups", "diversity_penalty", "exponential_decay_length_penalty"}
)
#: sampling_params keys read elsewhere (budget, greedy/sampling), not passed on by name.
_HANDLED_KEYS = frozenset({"max_new_tokens", "max_tokens", "do_sample", *SAMPLING_KEYS})

_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(key: str, message: str) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message)


# --------------------------------------------------------------------------------------------------
# Pure functions: settings -> generate() arguments, messages.


def generation_kwargs(sampling_params: Mapping[str, Any]) -> dict[str, Any]:
    """`generate()` keyword arguments from the op's `sampling_params`.

    `max_new_tokens` (or `max_tokens`, default 256); `do_sample` from `wants_sampling`; the sampling knobs
    (`temperature`, `top_p`, `top_k`, `min_p`, `typical_p`) only when sampling; `repetition_penalty`,
    `min_new_tokens`, `num_beams` and similar as given. Keys transformers does not know (`presence_penalty`,
    `stop`, `seed`, ...) are dropped with one warning.
    """
    sample = wants_sampling(sampling_params)
    kwargs: dict[str, Any] = {"max_new_tokens": answer_budget(sampling_params), "do_sample": sample}
    for key, value in sampling_params.items():
        if value is None:
            continue
        if key in SAMPLING_KEYS:
            if sample and not (key == "temperature" and value == 0):
                kwargs[key] = value
        elif key in GENERATE_KEYS:
            kwargs[key] = value
        elif key not in _HANDLED_KEYS:
            _warn_once(f"sampling:{key}", f"HF engine ignores sampling_params.{key} (transformers has no such option)")
    return kwargs


def build_messages(request: Request) -> list[dict[str, Any]]:
    """The chat for one image: the system prompt (when not empty), then the user's text and the image.

    Same order as the API engine (text, then image), so a model answers alike through either engine.
    """
    messages: list[dict[str, Any]] = []
    if request.system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": request.system_prompt}]})
    messages.append({"role": "user", "content": [{"type": "text", "text": request.user_text}, {"type": "image"}]})
    return messages


def _chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


# --------------------------------------------------------------------------------------------------
# Loading (imports torch / transformers).


def _require_extra() -> None:
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise EngineError(
            f"the hf engine needs {' and '.join(missing)}: pip install 'vlmtag[hf]' "
            "(or use the API engine: is_api_model: true)"
        )


def _images_only_video_processor_class():
    """A video processor that only exists so that image-and-video processors can be built without torchvision."""
    from transformers.video_processing_utils import VideoProcessorMixin

    class ImagesOnlyVideoProcessor(VideoProcessorMixin):
        merge_size = 2
        temporal_patch_size = 2
        patch_size = 14

        def __call__(self, videos: Any = None, **kwargs: Any) -> Any:
            raise EngineError("videos are not supported here (this processor was built without torchvision)")

        preprocess = __call__

    return ImagesOnlyVideoProcessor


def _lenient_processor_class(cls: type, stand_in: type) -> type:
    """`cls` whose argument check accepts the stand-in as a video processor.

    From transformers 5.19 on, the check of `video_processor=` looks the expected class up in the video
    processor registry, which is not usable without torchvision; only that one check is relaxed.
    """

    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and isinstance(argument, stand_in):
            return stand_in
        return super(lenient, self).check_argument_for_proper_class(argument_name, argument)

    lenient = type(cls.__name__, (cls,), {"check_argument_for_proper_class": check_argument_for_proper_class})
    return lenient


def _read_chat_template(folder: str) -> str | None:
    from pathlib import Path

    path = Path(folder)
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    as_json = path / "chat_template.json"
    if as_json.is_file():
        return json.loads(as_json.read_text()).get("chat_template")
    return None


def load_processor(folder: str, model_type: str, load_kwargs: Mapping[str, Any]) -> Any:
    """The model's processor; assembled by hand when `AutoProcessor` cannot (no torchvision) or gives a tokenizer."""
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, ProcessorMixin

    kwargs = {k: load_kwargs[k] for k in ("revision", "trust_remote_code", "cache_dir", "token") if k in load_kwargs}
    first_error: Exception | None = None
    try:
        processor = AutoProcessor.from_pretrained(folder, **kwargs)
        if isinstance(processor, ProcessorMixin) and hasattr(processor, "image_processor"):
            return processor
    except Exception as e:  # noqa: BLE001 - e.g. ImportError: the video processor needs torchvision
        first_error = e

    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    class_name = PROCESSOR_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
    if cls is None:
        raise EngineError(
            f"cannot build a processor for model type {model_type!r} from {folder}: {first_error or 'no processor class'}"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    parts: dict[str, Any] = {"image_processor": AutoImageProcessor.from_pretrained(folder, **kwargs), "tokenizer": tokenizer}
    if "video_processor" in cls.get_attributes():
        stand_in = _images_only_video_processor_class()
        cls = _lenient_processor_class(cls, stand_in)
        parts["video_processor"] = stand_in()
    chat_template = getattr(tokenizer, "chat_template", None) or _read_chat_template(folder)
    # Processor-specific settings saved beside the model (e.g. Idefics3's image_seq_len).
    extra: dict[str, Any] = {}
    try:
        with open(f"{folder}/processor_config.json") as f:
            extra = {k: v for k, v in json.load(f).items() if k not in ("processor_class", "image_processor")}
    except (OSError, ValueError):
        pass
    try:
        return cls(**parts, chat_template=chat_template, **extra)
    except TypeError:
        return cls(**parts, chat_template=chat_template)


def _dtype_of(value: Any) -> Any:
    import torch

    if isinstance(value, str) and value != "auto":
        name = value.removeprefix("torch.")
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise EngineError(f"model_params.dtype: unknown torch dtype {value!r}")
        return dtype
    return value


class HFEngine(Engine):
    """Local inference with Hugging Face transformers (CPU or GPU)."""

    kind = "hf"

    def __init__(self, settings: EngineSettings, *, model: Any = None, processor: Any = None) -> None:
        """Load `settings.model` (a folder, a cached snapshot or a hub name) with its processor.

        `model` / `processor`: already-loaded objects to use instead (benchmarks build a model in memory);
        `settings.model` must then still name a folder with the processor files when `processor` is None.
        """
        _require_extra()
        params = dict(settings.model_params)
        folder = settings.model
        if model is None or processor is None:
            try:
                folder = resolve_model(settings.model, params)
            except ModelNotFound as e:
                raise EngineError(str(e)) from None

        import torch
        import transformers
        from transformers import AutoConfig, AutoModelForImageTextToText

        self.settings = settings
        self._torch = torch
        self._lock = threading.Lock()
        cuda = torch.cuda.is_available()
        batch_size = params.pop("batch_size", None)
        self.batch_size = int(batch_size) if batch_size else (DEFAULT_BATCH_SIZE_GPU if cuda else DEFAULT_BATCH_SIZE_CPU)
        if self.batch_size < 1:
            raise EngineError(f"model_params.batch_size must be >= 1 (got {batch_size!r})")

        load = {k: v for k, v in params.items() if k not in ENGINE_PARAMS}
        dtype = load.pop("dtype", None)
        torch_dtype = load.pop("torch_dtype", None)
        dtype = _dtype_of(dtype if dtype is not None else torch_dtype if torch_dtype is not None else
                          ("auto" if cuda else torch.float32))
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        load[dtype_key] = dtype
        load.setdefault("device_map", "cuda" if cuda else "cpu")
        try:
            if processor is None:
                config_kwargs = {k: v for k, v in load.items() if k in ("revision", "trust_remote_code", "token")}
                model_type = model.config.model_type if model is not None else \
                    AutoConfig.from_pretrained(folder, **config_kwargs).model_type
                processor = load_processor(folder, model_type, load)
            if model is None:
                model = AutoModelForImageTextToText.from_pretrained(folder, **load)
        except EngineError:
            raise
        except Exception as e:  # noqa: BLE001 - one line at build time, whatever transformers raised
            raise EngineError(
                f"cannot load model {settings.model!r} from {folder} with transformers: {type(e).__name__}: {e}"
            ) from None
        self.model = model.eval()
        self.processor = processor

        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._tokenizer = tokenizer
        self._stop_ids = self._stop_token_ids()
        self._generate_kwargs = generation_kwargs(settings.sampling_params)
        self._generate_kwargs["pad_token_id"] = tokenizer.pad_token_id
        self._grammar = None
        if settings.json_schema:
            self._grammar = self._compile_grammar(settings.json_schema)
            self._generate_kwargs["suppress_tokens"] = self._special_ids_except_stop()

    # -- setup helpers ---------------------------------------------------------------------------------------

    def _stop_token_ids(self) -> list[int]:
        ids: list[int] = []
        for source in (self.model.generation_config.eos_token_id, self._tokenizer.eos_token_id):
            for value in source if isinstance(source, (list, tuple)) else [source]:
                if isinstance(value, int) and value not in ids:
                    ids.append(value)
        if not ids:
            raise EngineError(f"model {self.settings.model!r} has no end-of-sequence token")
        return ids

    def _special_ids_except_stop(self) -> list[int]:
        tok = self._tokenizer
        special = set(tok.all_special_ids)
        for token_id, added in getattr(tok, "added_tokens_decoder", {}).items():
            if getattr(added, "special", False):
                special.add(int(token_id))
        vocab_rows = self._vocab_rows()
        return sorted(i for i in special if i not in self._stop_ids and 0 <= i < vocab_rows)

    def _vocab_rows(self) -> int:
        """Rows of the output layer: the real vocabulary size (checkpoints pad it beyond the tokenizer's)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    def _compile_grammar(self, schema: dict[str, Any]) -> Any:
        try:
            import xgrammar as xgr
        except ImportError:
            raise EngineError("json_schema with the hf engine needs xgrammar: pip install 'vlmtag[hf]'") from None
        info = xgr.TokenizerInfo.from_huggingface(
            self._tokenizer, vocab_size=self._vocab_rows(), stop_token_ids=self._stop_ids
        )
        # No free whitespace: with it, greedy decoding can emit newlines until the token budget ends.
        return xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False)

    # -- inference -------------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Response]:
        responses: list[Response | None] = [None] * len(requests)
        images: dict[int, Any] = {}
        for k, request in enumerate(requests):
            try:
                images[k] = _decode(request.image.data)
            except Exception as e:  # noqa: BLE001 - a bad payload fails its own request only
                responses[k] = Response(error=f"cannot decode image: {type(e).__name__}: {e}")
        # Similar sizes together: similar token counts, little padding.
        order = sorted(images, key=lambda k: -(requests[k].image.width * requests[k].image.height))
        with self._lock:
            for chunk in _chunks(order, self.batch_size):
                for k, response in zip(chunk, self._run_isolating([requests[k] for k in chunk], [images[k] for k in chunk])):
                    responses[k] = response
        return [r if r is not None else Response(error="no answer") for r in responses]

    def _run_isolating(self, requests: list[Request], images: list[Any]) -> list[Response]:
        """One batch; on out-of-memory, halves; on any other failure, retries one by one to isolate the bad one."""
        torch = self._torch
        try:
            return self._run_batch(requests, images)
        except torch.cuda.OutOfMemoryError:
            if len(requests) == 1:
                return [Response(error="out of GPU memory for one image (lower max_pixels or use a smaller dtype)",
                                 retryable=False)]
            torch.cuda.empty_cache()
            half = len(requests) // 2
            self.batch_size = max(1, min(self.batch_size, half))
            log.warning("HF engine: out of GPU memory; batch size lowered to %d", self.batch_size)
            return self._run_isolating(requests[:half], images[:half]) + self._run_isolating(requests[half:], images[half:])
        except Exception as e:  # noqa: BLE001 - per-request failures are responses
            if len(requests) == 1:
                return [Response(error=f"generation failed: {type(e).__name__}: {e}")]
            log.warning("HF engine: a batch of %d failed (%s); retrying one by one", len(requests), e)
            return [self._run_isolating([r], [im])[0] for r, im in zip(requests, images)]

    def _run_batch(self, requests: list[Request], images: list[Any]) -> list[Response]:
        torch = self._torch
        processor = self.processor
        texts = [
            processor.apply_chat_template(build_messages(r), add_generation_prompt=True, tokenize=False)
            for r in requests
        ]
        inputs = processor(text=texts, images=[[im] for im in images], padding=True, return_tensors="pt")
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        kwargs = dict(self._generate_kwargs)
        if self._grammar is not None:
            import xgrammar as xgr

            kwargs["logits_processor"] = [xgr.contrib.hf.LogitsProcessor(self._grammar)]  # holds state: one per call
        with torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs)
        prompt_len = inputs["input_ids"].shape[1]
        new_tokens = output[:, prompt_len:].cpu()
        texts_out = self._tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        prompt_counts = inputs["attention_mask"].sum(dim=1).tolist()
        responses = []
        for text, tokens, prompt_tokens in zip(texts_out, new_tokens.tolist(), prompt_counts):
            usage = Usage(prompt_tokens=int(prompt_tokens), completion_tokens=_completion_length(tokens, self._stop_ids))
            responses.append(Response(text=text.strip(), usage=usage))
        return responses

    def close(self) -> None:
        with self._lock:
            self.model = None
            self.processor = None
            if self._torch.cuda.is_available():
                self._torch.cuda.empty_cache()


def _decode(data: bytes) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def _completion_length(tokens: list[int], stop_ids: list[int]) -> int:
    """New tokens up to and including the first stop token (the rest is padding)."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return i + 1
    return len(tokens)
