"""`vlmtag_image_tagging_mapper`: vlmtag's tagger as a Data-Juicer `Mapper`.

A thin adapter: Data-Juicer hands it batches (`process_batched(samples, rank)`, through `op.process`), it hands
them to vlmtag's own operator (`ImageTaggingVLMMapper.process`) and gives back what that returns. Everything
vlmtag guarantees holds inside Data-Juicer: tags aligned with `images` (duplicates included), the
`<tag_field_name>_errors` record, real retries, true MIME types, no row dropped for a bad image.

What the adapter adds for Data-Juicer:

- the explicit signature Data-Juicer's preflight and config parser need (`vlmtag.dj.signature`);
- its own batch size (`default_batch_size`), so `concurrency` requests stay in flight, where Data-Juicer would
  give 1,000 rows (CPU operators) or 10 (CUDA operators);
- the answer cache, opened in each worker process at one stable path (`vlmtag.dj.default_cache_path()` unless
  the recipe says `cache_path`), so a rerun, or a run restarted after a kill, pays only for what it lacks;
- `skip_op_error` is always off for this operator: per-image failures never raise (they are recorded), so an
  exception here is a run-level stop (fail-fast, `max_cost`) and must stop `dj-process` rather than silently
  drop the batch's rows;
- registration under `vlmtag_image_tagging_mapper`, and under Data-Juicer's own `image_tagging_vlm_mapper` only
  when `VLMTAG_REPLACE_DJ_TAGGER=1` (`vlmtag.dj.SERVE_DJ_NAME_ENV`).

Importing this module registers the operator (the `data_juicer.ops` entry point and the file for
`custom_operator_paths` both import it); registering again is harmless.
"""

from __future__ import annotations

import os
from typing import Any

from data_juicer.ops.base_op import OP, OPERATORS, TAGGING_OPS, Mapper

from vlmtag.config import expand_env
from vlmtag.dj import DJ_OP_NAME, OP_NAME, SERVE_DJ_NAME_ENV, default_cache_path, serve_dj_name
from vlmtag.dj.signature import op_signature, tagger_names
from vlmtag.errors import ConfigError, did_you_mean
from vlmtag.ops.image_tagging_vlm_mapper import ImageTaggingVLMMapper
from vlmtag.ops.options import DATA_JUICER_OP_ARGS

__all__ = ["VlmtagImageTaggingMapper", "default_batch_size", "register"]

#: The `__signature__` of the operator's `__init__`: Data-Juicer's, vlmtag's options, the cache, DJ's generic ones.
SIGNATURE = op_signature(OP._BASE_PARAMS)
_TAGGER_ARGS = frozenset(tagger_names())
# Data-Juicer's generic arguments that vlmtag's operator reads too (its `resources`)
_TAGGER_DJ_ARGS = frozenset({"num_proc", "num_cpus", "num_gpus", "accelerator"}) & DATA_JUICER_OP_ARGS
# read by both Data-Juicer's base class and vlmtag's operator
_SHARED = ("text_key", "image_key", "image_bytes_key", "batch_size")
_ADAPTER_ARGS = frozenset({"cache_path", "use_cache"})


def default_batch_size(concurrency: int) -> int:
    """Rows per Data-Juicer batch unless the recipe sets `batch_size`: at least 256 (vlmtag's own batch) and at
    least two rounds of `concurrency` requests, so connections stay busy while a batch's last answers arrive."""
    return max(256, 2 * concurrency)


class VlmtagImageTaggingMapper(Mapper):
    """Tag images with a vision-language model (vlmtag); tags go to `__dj__meta__[tag_field_name]`, one list per
    entry of `images`, and the reason for each image that failed to `__dj__meta__[tag_field_name + "_errors"]`.

    Arguments: Data-Juicer's `image_tagging_vlm_mapper` signature, every vlmtag option (README, "Operator
    arguments"), `cache_path` / `use_cache` (the answer cache) and Data-Juicer's generic operator arguments.
    """

    _batched_op = True
    _accelerator = "cpu"  # an API client; local engines (hf, vllm) ask for "cuda" unless told otherwise

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            bound = SIGNATURE.bind(self, *args, **kwargs)
        except TypeError as e:
            raise ConfigError(f"{self._name or OP_NAME}: {e}{_suggestion(kwargs)}") from None
        bound.apply_defaults()
        params = dict(bound.arguments)
        del params["self"]

        from data_juicer.utils.mm_utils import SpecialTokens

        params["image_special_token"] = params["image_special_token"] or SpecialTokens.image
        params["eoc_special_token"] = params["eoc_special_token"] or SpecialTokens.eoc
        if params["batch_size"] is None:
            concurrency = params["concurrency"]  # not validated yet: vlmtag's operator names a bad value below
            params["batch_size"] = default_batch_size(concurrency if isinstance(concurrency, int) else 1)
        # `${VAR}` / `${VAR:-default}` as in vlmtag's recipes (Data-Juicer does not expand them): keys stay out of
        # the recipe, and out of the recipe Data-Juicer prints when it starts
        tagger_kwargs = expand_env({k: v for k, v in params.items() if k in _TAGGER_ARGS})
        tagger_kwargs.update({k: params[k] for k in _TAGGER_DJ_ARGS if params.get(k) is not None})
        self._tagger_kwargs = tagger_kwargs
        self._tagger = ImageTaggingVLMMapper(**tagger_kwargs)  # validates every option now, before any data

        dj_kwargs = {k: v for k, v in params.items()
                     if k not in _TAGGER_ARGS and k not in _ADAPTER_ARGS and v is not None}
        dj_kwargs.update({k: params[k] for k in _SHARED})
        dj_kwargs["skip_op_error"] = False  # see the module docstring
        if params.get("accelerator") is None and self._tagger.resources.local_model:
            dj_kwargs["accelerator"] = "cuda"
        super().__init__(**dj_kwargs)

        self.tag_field_name = self._tagger.tag_field_name
        self.use_cache = bool(params["use_cache"])
        self.cache_path = os.path.abspath(os.path.expanduser(params["cache_path"] or default_cache_path()))
        self._pid: int | None = None  # the process the tagger below was set up in

    # -- Data-Juicer's entry point ---------------------------------------------------------------------------

    def process_batched(self, samples: dict, rank: int | None = None, *args: Any, **kwargs: Any) -> dict:
        """A batch of columns (or, from a non-batched `map`, one sample); `rank` is accepted positionally."""
        tagger = self._tagger_here()
        before = tagger.stats.as_dict()
        out = tagger.process(samples, rank)
        self._log_batch(before, tagger.stats.as_dict())
        return out

    def _tagger_here(self) -> ImageTaggingVLMMapper:
        """vlmtag's operator, set up in this process: a worker process (np > 1) builds its own engine and opens
        its own connection to the answer cache."""
        pid = os.getpid()
        if self._pid != pid:
            if self._pid is not None:  # a copy made by fork: the parent's engine threads are not here
                self._tagger = ImageTaggingVLMMapper(**self._tagger_kwargs)
            self._tagger.attach_cache(self._open_cache())
            self._pid = pid
        return self._tagger

    def _open_cache(self):
        if not self.use_cache:
            return None
        import sqlite3

        from loguru import logger

        from vlmtag.cache.sqlite import SqliteAnswerCache

        try:
            return SqliteAnswerCache(self.cache_path)
        except (OSError, sqlite3.Error) as e:
            logger.warning(f"{self._name}: cannot open the answer cache at {self.cache_path} ({e}); "
                           "running without it")
            return None

    def _log_batch(self, before: dict, after: dict) -> None:
        from loguru import logger

        failed = after["failed"] - before["failed"]
        images = after["images"] - before["images"]
        cached = after["cached"] - before["cached"]
        if failed:
            reasons = {k: v - before["failure_reasons"].get(k, 0) for k, v in after["failure_reasons"].items()}
            top = ", ".join(f"{k}: {n}" for k, n in sorted(reasons.items(), key=lambda kv: -kv[1]) if n)
            logger.warning(f"{self._name}: {failed} of {images} images in this batch failed ({top}); the reasons "
                           f"are in __dj__meta__.{self._tagger.error_field_name}")
        else:
            logger.debug(f"{self._name}: {images} images tagged ({cached} from the answer cache)")


VlmtagImageTaggingMapper.__init__.__signature__ = SIGNATURE  # type: ignore[attr-defined]
# what inspect.signature(cls) and help() show (Data-Juicer's metaclass would otherwise show `*args, **kwargs`)
VlmtagImageTaggingMapper.__signature__ = SIGNATURE.replace(parameters=list(SIGNATURE.parameters.values())[1:])


class ReplacesDJTagger(VlmtagImageTaggingMapper):
    """vlmtag's operator under Data-Juicer's own name `image_tagging_vlm_mapper` (opt-in, VLMTAG_REPLACE_DJ_TAGGER)."""


def _suggestion(kwargs: dict) -> str:
    names = [p for p in SIGNATURE.parameters if p != "self"]
    return next((hint for key in kwargs if key not in SIGNATURE.parameters and (hint := did_you_mean(key, names))), "")


def _register(name: str, cls: type, *, replace: bool = False) -> None:
    current = OPERATORS.modules.get(name)
    if current is cls:
        return
    if current is not None and not replace:
        raise KeyError(f"{name} is already registered in Data-Juicer by {current.__module__}.{current.__qualname__}")
    OPERATORS.register_module(name, cls, force=True)
    TAGGING_OPS.register_module(name, cls, force=True)  # Data-Juicer adds the meta column before a tagging op


def register() -> None:
    """Register `vlmtag_image_tagging_mapper`, and `image_tagging_vlm_mapper` too when the opt-in switch is on.
    Registering again (entry point and `custom_operator_paths` in one run) changes nothing."""
    _register(OP_NAME, VlmtagImageTaggingMapper)
    if serve_dj_name():
        from loguru import logger

        if OPERATORS.modules.get(DJ_OP_NAME) is not ReplacesDJTagger:
            logger.info(f"{SERVE_DJ_NAME_ENV} is set: {DJ_OP_NAME} runs vlmtag's implementation")
        _register(DJ_OP_NAME, ReplacesDJTagger, replace=True)


register()
