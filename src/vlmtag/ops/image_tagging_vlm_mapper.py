"""`image_tagging_vlm_mapper`: tag every image of a sample with a vision-language model.

The operator turns a batch of samples into requests (one per distinct image and prompt), asks its engine,
retries what failed within the `try_num` budget, parses the answers into tags and writes them into the
sample's meta field, aligned with the sample's `images`. It opens no dataset files and knows nothing of
executors or caches: rows come in, the same rows go out, in the same order.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pydantic import ValidationError
from tenacity import Retrying, retry_if_exception, retry_if_result, stop_after_attempt, wait_exponential, wait_random

from vlmtag.cache.base import AnswerCache
from vlmtag.cost import Pricing, text_tokens, visual_tokens
from vlmtag.engines import Engine, EngineSettings, Request, Response, create_engine
from vlmtag.errors import ConfigError, config_error
from vlmtag.images import EncodedImage, FetchLimits, ImageError, prepare_image, read_source
from vlmtag.ops.fail_fast import FailFast, RunAborted
from vlmtag.ops.options import DATA_JUICER_OP_ARGS, DEFAULT_MODEL, TaggerArguments, resolve_engine_kind
from vlmtag.ops.registry import register
from vlmtag.rowkeys import BYTES_KEY, META_KEY
from vlmtag.prompts import DEFAULT_INPUT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, clean_text, fill_template
from vlmtag.stats import TaggingStats
from vlmtag.tags import TagParseError, parse_output, tags_json_schema

if TYPE_CHECKING:
    from vlmtag.tags.vocabulary import Vocabulary

log = logging.getLogger(__name__)

_MAX_RETRY_AFTER = 300.0
_MAX_ENUM_TERMS = 2000  # beyond this a schema enum is too large for most constrained decoders
# model_params that configure the client, not the answer: left out of the cache key (and never stored).
_CLIENT_PARAMS = frozenset({"api_key", "base_url", "timeout", "max_retries", "headers", "default_headers",
                            "default_query", "organization", "project"})


@dataclass
class _Outcome:
    tags: list[str] | None = None
    error: str | None = None
    unmapped: list[str] = field(default_factory=list)


@register("image_tagging_vlm_mapper")
class ImageTaggingVLMMapper:
    """Tag images with a vision-language model; tags go to `sample["__dj__meta__"][tag_field_name]`.

    The signature is Data-Juicer's. Extra keyword arguments are vlmtag's own options (`TaggerOptions`):
    `concurrency`, `batch_size`, `max_pixels`, `max_tags`, `max_tag_length`, `image_key`, `image_bytes_key`,
    `text_key`, `json_schema`, `engine`, `max_requests_per_minute`, `max_tokens_per_minute`, `retry_backoff`,
    `fail_fast`, ... Data-Juicer's generic op arguments (`num_proc`, `accelerator`, ...) are accepted and ignored;
    any other name is a `ConfigError`. Building the operator never touches the network or loads a model.
    """

    def __init__(
        self,
        api_or_hf_model: str = DEFAULT_MODEL,
        is_api_model: bool = False,
        *,
        tag_field_name: str = "image_tags",
        api_endpoint: str | None = None,
        response_path: str | None = None,
        system_prompt: str | None = None,
        input_template: str | None = None,
        model_params: dict | None = None,
        sampling_params: dict | None = None,
        try_num: int = 3,
        **kwargs: Any,
    ) -> None:
        # How to build this operator again in another process (executors for `np` > 1 and Ray need it).
        self.spec = ("image_tagging_vlm_mapper", dict(
            api_or_hf_model=api_or_hf_model, is_api_model=is_api_model, tag_field_name=tag_field_name,
            api_endpoint=api_endpoint, response_path=response_path, system_prompt=system_prompt,
            input_template=input_template, model_params=model_params, sampling_params=sampling_params,
            try_num=try_num, **kwargs))
        ignored = {k: kwargs.pop(k) for k in list(kwargs) if k in DATA_JUICER_OP_ARGS}
        self.num_proc = ignored.get("num_proc")
        try:
            opts = TaggerArguments(
                api_or_hf_model=api_or_hf_model,
                is_api_model=is_api_model,
                tag_field_name=tag_field_name,
                api_endpoint=api_endpoint,
                response_path=response_path,
                system_prompt=system_prompt,
                input_template=input_template,
                model_params=model_params or {},
                sampling_params=sampling_params or {},
                try_num=try_num,
                **kwargs,
            )
        except ValidationError as e:
            raise config_error(e, "image_tagging_vlm_mapper", TaggerArguments.model_fields) from None
        self.options = opts
        self.tag_field_name = opts.tag_field_name
        self.error_field_name = opts.tag_field_name + "_errors"
        self.system_prompt = opts.system_prompt if opts.system_prompt is not None else DEFAULT_SYSTEM_PROMPT
        self.input_template = opts.input_template if opts.input_template is not None else DEFAULT_INPUT_TEMPLATE
        self.engine_kind = resolve_engine_kind(opts.api_or_hf_model, opts.is_api_model, opts.engine)
        self.vocabulary = self._load_vocabulary(opts)
        self.unmapped_field_name = opts.tag_field_name + "_unmapped"
        self.json_schema = None
        if opts.json_schema:
            enum = self.vocabulary.json_enum(max_terms=_MAX_ENUM_TERMS) if opts.constrain_to_vocabulary else None
            self.json_schema = tags_json_schema(opts.max_tags, opts.max_tag_length, enum=enum)
        self.stats = TaggingStats()
        self.pricing = Pricing(opts.price_per_million_input_tokens, opts.price_per_million_output_tokens)
        self._budget_lock = threading.Condition()
        self._reserved = 0.0
        if opts.max_cost is not None and not self.pricing.known:
            raise ConfigError("image_tagging_vlm_mapper: max_cost needs price_per_million_input_tokens and/or "
                              "price_per_million_output_tokens")
        self.cache: AnswerCache | None = None  # attached by the executor; None = no cache
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._breaker = FailFast()
        self._fetch_limits = FetchLimits(read_timeout=opts.fetch_timeout, max_bytes=opts.max_image_bytes)
        self._backoff = wait_exponential(multiplier=opts.retry_backoff, max=opts.max_backoff) + wait_random(
            0, opts.retry_backoff
        )

    # -- lifecycle -------------------------------------------------------------------------------------------

    def engine_settings(self) -> EngineSettings:
        o = self.options
        return EngineSettings(
            model=o.api_or_hf_model,
            kind=self.engine_kind,
            model_params=dict(o.model_params),
            sampling_params=dict(o.sampling_params),
            api_endpoint=o.api_endpoint,
            response_path=o.response_path,
            concurrency=o.concurrency,
            json_schema=self.json_schema,
            max_pixels=o.max_pixels,
            max_requests_per_minute=o.max_requests_per_minute,
            max_tokens_per_minute=o.max_tokens_per_minute,
        )

    @property
    def engine(self) -> Engine:
        """The engine, built on first use (so constructing the operator stays cheap and offline)."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = create_engine(self.engine_settings())
            return self._engine

    def setup(self) -> None:
        """Build the engine now, so a bad setting fails before any data is read."""
        _ = self.engine

    def close(self) -> None:
        with self._engine_lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- parsing -----------------------------------------------------------------------------------------------

    def parse_output(self, raw: str) -> list[str]:
        """Normalised tags from one raw model answer; raises `TagParseError` (a ValueError) when there are none.
        With a vocabulary, tags are mapped onto it (normalise → map → drop duplicates → first `max_tags`)."""
        return self._finish([self._read_answer(raw)])[0][0]

    def _read_answer(self, raw: str) -> list[str]:
        """Normalised tags, not yet mapped or cut to `max_tags` when a vocabulary will map them."""
        o = self.options
        limit = 10**9 if self.vocabulary is not None else o.max_tags
        return parse_output(raw, max_tags=limit, max_tag_length=o.max_tag_length)

    def _finish(self, tag_lists: list[list[str]]) -> list[tuple[list[str], list[str]]]:
        """(tags, unmapped tags) per list: vocabulary mapping (one batch) and the `max_tags` cut."""
        if self.vocabulary is None:
            return [(tags, []) for tags in tag_lists]
        mapped = self.vocabulary.map_tag_lists(tag_lists, self.options.unmapped)
        return [(kept[: self.options.max_tags], unmapped) for kept, unmapped in mapped]

    @staticmethod
    def _load_vocabulary(opts: "TaggerArguments") -> "Vocabulary | None":
        if opts.vocabulary is None:
            if opts.synonyms or opts.constrain_to_vocabulary:
                raise ConfigError("image_tagging_vlm_mapper: synonyms/constrain_to_vocabulary need a vocabulary")
            return None
        from vlmtag.tags.vocabulary import Vocabulary

        try:
            return Vocabulary.from_files(opts.vocabulary, opts.synonyms, embedding_threshold=opts.vocabulary_threshold,
                                         use_embeddings=opts.vocabulary_embeddings)
        except ConfigError as e:
            raise ConfigError(f"image_tagging_vlm_mapper: {e}") from None

    # -- Data-Juicer entry points -----------------------------------------------------------------------------

    def process_single(self, sample: dict, *, base_dir: str | None = None) -> dict:
        batch = {k: [v] for k, v in sample.items()}
        out = self.process_batched(batch, base_dir=base_dir)
        return {k: v[0] for k, v in out.items()}

    def process_batched(self, samples: dict[str, list], *, base_dir: str | None = None) -> dict[str, list]:
        """Tag a batch in Data-Juicer's columnar form. Relative image paths resolve against `base_dir`."""
        o = self.options
        n = max((len(v) for v in samples.values()), default=0)
        metas = samples.get(META_KEY) or [None] * n
        attached = samples.get(BYTES_KEY)
        images_key = o.image_key if o.image_key in samples or attached is None else "images"
        samples[META_KEY] = self.tag_columns(
            images=samples.get(images_key) or [None] * n,
            texts=samples.get(o.text_key) or [None] * n,
            image_bytes=samples.get(o.image_bytes_key) or attached or [None] * n,
            metas=metas,
            base_dir=base_dir,
        )
        return samples

    def process_rows(self, rows: list[dict], *, base_dir: str | None = None) -> list[dict]:
        """Tag a list of row dicts (the executors' form); each row keeps exactly its own keys, plus the meta."""
        o = self.options
        metas = self.tag_columns(
            # readers that attach bytes (WebDataset, Parquet image columns) name them under "images"
            images=[r.get(o.image_key if o.image_key in r or BYTES_KEY not in r else "images") for r in rows],
            texts=[r.get(o.text_key) for r in rows],
            image_bytes=[r.get(o.image_bytes_key) or r.get(BYTES_KEY) for r in rows],
            metas=[r.get(META_KEY) for r in rows],
            base_dir=base_dir,
        )
        for row, meta in zip(rows, metas):
            row[META_KEY] = meta
        return rows

    # -- the work ----------------------------------------------------------------------------------------------

    def tag_columns(
        self,
        *,
        images: Sequence[Any],
        texts: Sequence[Any],
        image_bytes: Sequence[Any],
        metas: Sequence[Any],
        base_dir: str | None,
    ) -> list[Any]:
        """Return the new meta column: for each row, its meta dict with the tag and error fields set."""
        o = self.options
        tokens = (o.image_special_token, o.eoc_special_token)
        new_metas: list[Any] = []
        distinct: dict[tuple, int] = {}  # image key -> index in `sources`
        sources: list[str | bytes | _BadEntry] = []
        requests: dict[tuple[int, str], int] = {}  # (image index, prompt) -> request index
        slots: list[tuple[int, int, int]] = []  # (row, position in images, request index)
        skipped = 0
        separate = self.vocabulary is not None and o.unmapped == "separate"
        for i, meta in enumerate(metas):
            meta = {} if meta is None else meta
            if not isinstance(meta, dict) or (self.tag_field_name in meta and not o.overwrite):
                skipped += 1
                new_metas.append(meta)
                continue
            meta = dict(meta)
            new_metas.append(meta)
            row_images = images[i] if isinstance(images[i], list) else ([] if images[i] is None else [images[i]])
            row_bytes = image_bytes[i] if isinstance(image_bytes[i], list) else []
            if not row_images and row_bytes:
                row_images = [None] * len(row_bytes)
            meta[self.tag_field_name] = [[] for _ in row_images] or [[]]
            meta[self.error_field_name] = [None] * len(meta[self.tag_field_name])
            if separate:
                meta[self.unmapped_field_name] = [[] for _ in meta[self.tag_field_name]]
            if not row_images:
                continue
            prompt = fill_template(self.input_template, clean_text(texts[i], tokens))
            for j, path in enumerate(row_images):
                raw = row_bytes[j] if j < len(row_bytes) and row_bytes[j] is not None else None
                source, key = _source_and_key(path, raw, base_dir, (i, j))
                img = distinct.setdefault(key, len(sources))
                if img == len(sources):
                    sources.append(source)
                slots.append((i, j, requests.setdefault((img, prompt), len(requests))))
        self.stats.add(rows=len(metas), rows_skipped=skipped, images=len(slots))

        outcomes = self._tag_distinct(sources, list(requests), base_dir)
        done = [k for k, o in enumerate(outcomes) if o.tags is not None]
        for k, (tags, unmapped) in zip(done, self._finish([outcomes[k].tags for k in done])):
            outcomes[k].tags, outcomes[k].unmapped = tags, unmapped
        for i, j, r in slots:
            outcome = outcomes[r]
            meta = new_metas[i]
            if outcome.tags is not None:
                meta[self.tag_field_name][j] = list(outcome.tags)
                if separate:
                    meta[self.unmapped_field_name][j] = list(outcome.unmapped)
                self.stats.add(tagged=1)
            else:
                meta[self.error_field_name][j] = outcome.error
                self.stats.add_failure(outcome.error or "error")
        return new_metas

    def _map(self, fn: Callable[[Any], Any], items: list, workers: int | None = None) -> list:
        """`fn` over `items` on the image thread pool (reading and resizing release the GIL), one contiguous
        chunk per worker: a task per image would cost more in futures and GIL hand-offs than small images
        cost to prepare, and slow the API engine's event loop, which shares the GIL."""
        if len(items) <= 1:
            return [fn(x) for x in items]
        if self._pool is None:
            with self._engine_lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.options.image_workers, thread_name_prefix="vlmtag-image")
        size = -(-len(items) // (workers or self.options.image_workers))
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        return [y for done in self._pool.map(lambda chunk: [fn(x) for x in chunk], chunks) for y in done]

    def _tag_distinct(
        self, sources: list[str | bytes | _BadEntry], requests: list[tuple[int, str]], base_dir: str | None
    ) -> list[_Outcome]:
        """One outcome per distinct (image, prompt): from the cache when it has the answer, else the engine."""

        def read(source: str | bytes | _BadEntry) -> bytes | str:
            if isinstance(source, _BadEntry):
                return source.error
            if isinstance(source, bytes):
                return source
            try:
                for attempt in Retrying(stop=stop_after_attempt(self.options.try_num), wait=self._backoff,
                                        retry=retry_if_exception(lambda e: getattr(e, "retryable", False)),
                                        reraise=True):
                    with attempt:  # a URL that timed out or answered 429/5xx gets the same attempt budget
                        return read_source(source, base_dir=base_dir, limits=self._fetch_limits)
            except ImageError as e:
                return str(e)

        # Reading waits on the network for URLs (use all `image_workers`); local files and preparing are
        # CPU work, where threads beyond a few per core only fight over the GIL with the API engine's loop.
        cpu_bound = min(self.options.image_workers, 2 * (os.cpu_count() or 1))
        remote = "://" in (base_dir or "") or any(isinstance(x, str) and "://" in x for x in sources)
        raws = self._map(read, sources, self.options.image_workers if remote else cpu_bound)
        digests = [hashlib.sha256(r).hexdigest() if isinstance(r, bytes) else None for r in raws]
        outcomes = [_Outcome() for _ in requests]
        keys: list[str | None] = [None] * len(requests)
        for r, (img, prompt) in enumerate(requests):
            if digests[img] is None:
                outcomes[r].error = raws[img]
            else:
                keys[r] = self.cache_key(digests[img], prompt)
        if self.cache is not None:
            hits = self.cache.get_many(k for k in keys if k)
            for r, key in enumerate(keys):
                if key in hits:
                    try:
                        outcomes[r].tags = self._read_answer(hits[key])
                        self.stats.add(cached=1)
                    except TagParseError:
                        pass  # e.g. stricter max_tag_length now: ask again

        todo = [r for r, o in enumerate(outcomes) if o.tags is None and o.error is None]
        needed = sorted({requests[r][0] for r in todo})

        def prepare(img: int) -> EncodedImage | str:
            try:
                return prepare_image(raws[img], max_pixels=self.options.max_pixels, sha256=digests[img])
            except ImageError as e:
                return str(e)

        prepared = dict(zip(needed, self._map(prepare, needed, cpu_bound)))
        work = []
        for r in todo:
            image = prepared[requests[r][0]]
            if isinstance(image, str):
                outcomes[r].error = image
            else:
                work.append((r, Request(image=image, system_prompt=self.system_prompt, user_text=requests[r][1])))
        self._run_requests(work, outcomes, keys)
        return outcomes

    def cache_key(self, image_sha256: str, prompt: str) -> str:
        """SHA-256 of the image bytes and of everything else that changes the model's answer."""
        return hashlib.sha256(f"{self.fingerprint}\x00{image_sha256}\x00{prompt}".encode()).hexdigest()

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of everything besides the image and prompt that changes the answer (cache keys, job identity)."""
        o = self.options
        answer_params = {k: v for k, v in o.model_params.items() if k not in _CLIENT_PARAMS}
        doc = {
            "v": 1,
            "engine": self.engine_kind,
            "model": o.api_or_hf_model,
            "system_prompt": self.system_prompt,
            "sampling_params": o.sampling_params,
            "model_params": answer_params,
            "schema": self.json_schema,
            "max_pixels": o.max_pixels,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def _run_requests(self, work: list[tuple[int, Request]], outcomes: list[_Outcome], keys: list[str | None]) -> None:
        """Send each request to the engine, spending up to `try_num` attempts on each; fill `outcomes`."""
        if not work:
            return
        reqs = dict(work)
        pending = list(reqs)
        attempts = dict.fromkeys(pending, 0)
        retry_after = [0.0]

        def one_round() -> list[int]:
            nonlocal pending
            batch = pending
            responses: list[Response | None] = [None] * len(batch)

            def on_response(i: int, resp: Response) -> None:
                # Runs as each answer arrives, so a crash loses only what was still in flight, and the
                # counters (tokens, cost) are current for the budget check of a round starting elsewhere.
                k = batch[i]
                attempts[k] += 1
                self.stats.add(requests=1, retries=int(attempts[k] > 1),
                               prompt_tokens=resp.usage.prompt_tokens, completion_tokens=resp.usage.completion_tokens)
                if resp.ok:
                    try:
                        outcomes[k].tags = self._read_answer(resp.text or "")
                    except TagParseError as e:
                        resp = Response(error=f"unparsable answer: {e}", retryable=True, usage=resp.usage)
                    else:
                        if self.cache is not None and keys[k] is not None:
                            self.cache.put_many([(keys[k], resp.text or "")])
                responses[i] = resp

            reserved = self._reserve_budget([reqs[k] for k in batch]) if self.options.max_cost is not None else 0.0
            try:
                self.engine.run_batch([reqs[k] for k in batch], on_response)
            finally:
                if reserved:
                    with self._budget_lock:
                        self._reserved -= reserved
                        self._budget_lock.notify_all()
            retry_after[0] = 0.0
            still: list[int] = []
            for k, resp in zip(batch, responses):
                assert resp is not None, "engine returned fewer responses than requests"
                if outcomes[k].tags is not None:
                    self._breaker.record(True)
                elif resp.retryable and attempts[k] < self.options.try_num:
                    still.append(k)
                    retry_after[0] = max(retry_after[0], min(resp.retry_after or 0.0, _MAX_RETRY_AFTER))
                else:
                    self._finish_failure(k, resp, attempts[k], outcomes)
            pending = still
            if self.options.fail_fast:
                self._breaker.check()
            return still

        def wait(state: Any) -> float:
            return max(self._backoff(state), retry_after[0])

        Retrying(
            stop=stop_after_attempt(self.options.try_num),
            wait=wait,
            retry=retry_if_result(bool),
            retry_error_callback=lambda state: state.outcome.result(),
        )(one_round)

    def spent(self) -> float:
        """What the answers so far cost, from the tokens the server reported (0 without prices)."""
        return self.pricing.cost(self.stats.prompt_tokens, self.stats.completion_tokens)

    def _reserve_budget(self, requests: list[Request]) -> float:
        """Stop before a round whose likely cost would take the run past `max_cost`; else reserve that cost
        until the round ends (so rounds running at the same time cannot overshoot together)."""
        with self._budget_lock:
            while True:
                spent, n = self.spent(), self.stats.requests
                if n:
                    estimate = spent / n * len(requests)
                else:
                    out = int(self.options.sampling_params.get("max_tokens") or 64)
                    estimate = sum(self.pricing.cost(visual_tokens(r.image.width, r.image.height)
                                                     + text_tokens(r.system_prompt + r.user_text), out)
                                   for r in requests)
                if spent + self._reserved + estimate <= self.options.max_cost:
                    self._reserved += estimate
                    return estimate
                if self._reserved <= 0:
                    raise RunAborted(f"max_cost={self.options.max_cost:g} reached: spent {spent:.4f} so far, the "
                                     f"next {len(requests)} requests would cost about {estimate:.4f}")
                self._budget_lock.wait()  # another round holds a reservation: see what it really cost

    def _finish_failure(self, k: int, resp: Response, attempts: int, outcomes: list[_Outcome]) -> None:
        error = resp.error or "error"
        if attempts > 1:
            error = f"{error} (after {attempts} attempts)"
        outcomes[k].error = error
        self._breaker.record(False, resp, error)


@dataclass(frozen=True)
class _BadEntry:
    error: str


def _source_and_key(path: Any, raw: Any, base_dir: str | None, where: tuple[int, int]) -> tuple[Any, tuple]:
    """What to load for one entry of `images`, and the key that makes identical images load once."""
    if raw is not None:
        if isinstance(raw, dict):  # Hugging Face `datasets` image column: {"bytes": ..., "path": ...}
            raw = raw.get("bytes")
        if isinstance(raw, (bytes, bytearray, memoryview)):
            data = bytes(raw)
            return data, ("bytes", hashlib.sha256(data).digest())
        return _BadEntry(f"bad image bytes entry: expected bytes, got {type(raw).__name__}"), ("bad", where)
    if isinstance(path, str) and path:
        return path, ("path", _resolve(path, base_dir))
    return _BadEntry(f"bad image entry: expected a path or URL, got {path!r:.40}"), ("bad", where)


def _resolve(path: str, base_dir: str | None) -> str:
    if "://" in path or base_dir is None or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(base_dir, path))
