"""`image_tagging_vlm_mapper`: tag every image of a sample with a vision-language model.

The operator gathers a batch into requests (one per distinct image and prompt), has its image loader read
them and sends them: with an engine that streams (the API engine) each request leaves as soon as its image is
ready (`stream.Dispatcher`); with one that works in batches, in rounds (`requests.RequestRunner`). It parses the
answers into tags and scatters them into each sample's meta field, aligned with the sample's `images`. Rows
come in, the same rows go out, in the same order.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from pydantic import ValidationError

from vlmtag.cost import Pricing
from vlmtag.defaults import DEFAULT_MODEL
from vlmtag.engines import Engine, EngineSettings, Request, Response, create_engine
from vlmtag.engines.base import CLIENT_PARAMS
from vlmtag.engines.sampling import answer_budget
from vlmtag.errors import ConfigError, config_error
from vlmtag.images import EncodedImage, FetchLimits
from vlmtag.ops.base import Resources
from vlmtag.ops.loader import ImageBytes, ImageLoader, Source, source_and_key
from vlmtag.ops.options import DATA_JUICER_OP_ARGS, TaggerArguments, resolve_engine_kind
from vlmtag.ops.registry import register
from vlmtag.ops.requests import RequestRunner
from vlmtag.ops.stream import Dispatcher
from vlmtag.prompts import DEFAULT_INPUT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, clean_text, fill_template
from vlmtag.rowkeys import BYTES_KEY, INVALID_ROW_KEY, META_KEY, error_field, unmapped_field
from vlmtag.stats import TaggingStats
from vlmtag.tags import TagParseError, parse_output, tags_json_schema

if TYPE_CHECKING:
    from vlmtag.cache.base import AnswerCache
    from vlmtag.tags.vocabulary import Vocabulary

__all__ = ["BatchWork", "Gathered", "ImageTaggingVLMMapper"]

_MAX_ENUM_TERMS = 2000  # beyond this a schema enum is too large for most constrained decoders


def _rebuild(cls: type, kwargs: dict) -> "ImageTaggingVLMMapper":
    return cls(**kwargs)


def _is_single_sample(samples: dict, text_key: str) -> bool:
    """Whether Data-Juicer handed one sample rather than a batch of columns (its non-batched `map`)."""
    meta = samples.get(META_KEY)
    if isinstance(meta, dict) or isinstance(samples.get(text_key), str):
        return True
    values = list(samples.values())
    if not values or not all(isinstance(v, list) for v in values):
        return True
    return len({len(v) for v in values}) != 1


@dataclass
class Gathered:
    """A batch as the operator asks it: distinct images, distinct (image, prompt) requests, and where each
    answer goes back."""

    metas: list[Any]  # the new meta column: rows to tag get a copy with empty tag and error fields
    sources: list[Source]  # distinct images
    requests: list[tuple[int, str]]  # distinct (index in `sources`, prompt)
    slots: list[tuple[int, int, int]]  # (row, position in its images, index in `requests`)
    skipped: int  # rows left as they are (already tagged and no `overwrite`, or a meta that is not a dict)
    prompts_cut: int = 0  # rows whose text was longer than `max_text_chars`


@dataclass
class BatchWork:
    """What tagging a batch of rows would send (batch mode, `vlmtag.batch`): each request under its cache key,
    which is stable across runs and so serves as a Batch API line's `custom_id`."""

    requests: dict[str, Request]  # cache key -> the request, for the image+prompts the cache cannot answer
    keys: list[list[str | None]]  # per row, per image: its cache key (None: unreadable, or the row is skipped)


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
    `fail_fast`, ... Data-Juicer's generic op arguments are accepted; of those, `num_proc`, `num_cpus`,
    `num_gpus` and `accelerator` go to `resources`, the rest change nothing. Any other name is a `ConfigError`.
    Building the operator never touches the network or loads a model.
    """

    name = "image_tagging_vlm_mapper"

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
        self.spec = (self.name, dict(
            api_or_hf_model=api_or_hf_model, is_api_model=is_api_model, tag_field_name=tag_field_name,
            api_endpoint=api_endpoint, response_path=response_path, system_prompt=system_prompt,
            input_template=input_template, model_params=model_params, sampling_params=sampling_params,
            try_num=try_num, **kwargs))
        dj = {k: kwargs.pop(k) for k in list(kwargs) if k in DATA_JUICER_OP_ARGS}
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
            raise config_error(e, self.name, TaggerArguments.model_fields) from None
        self.options = opts
        self.tag_field_name = opts.tag_field_name
        self.error_field_name = error_field(opts.tag_field_name)
        self.unmapped_field_name = unmapped_field(opts.tag_field_name)
        self.system_prompt = opts.system_prompt if opts.system_prompt is not None else DEFAULT_SYSTEM_PROMPT
        self.input_template = opts.input_template if opts.input_template is not None else DEFAULT_INPUT_TEMPLATE
        self.engine_kind = resolve_engine_kind(opts.api_or_hf_model, opts.is_api_model, opts.engine)
        self.resources = Resources(
            num_proc=dj.get("num_proc"),
            num_cpus=dj.get("num_cpus"),
            num_gpus=dj.get("num_gpus"),
            accelerator=dj.get("accelerator"),
            local_model=self.engine_kind in ("hf", "vllm"),
            gpus_per_model=opts.model_params.get("tensor_parallel_size") or 1,
            is_api=self.engine_kind == "api",
        )
        self.vocabulary = self._load_vocabulary(opts)
        self.json_schema = None
        if opts.json_schema:
            enum = self.vocabulary.json_enum(max_terms=_MAX_ENUM_TERMS) if opts.constrain_to_vocabulary else None
            self.json_schema = tags_json_schema(opts.max_tags, opts.max_tag_length, enum=enum)
        self.stats = TaggingStats()
        self.pricing = Pricing(opts.price_per_million_input_tokens, opts.price_per_million_output_tokens)
        if opts.max_cost is not None and not self.pricing.known:
            raise ConfigError(f"{self.name}: max_cost needs price_per_million_input_tokens and/or "
                              "price_per_million_output_tokens")
        self.cache: AnswerCache | None = None  # attached by the executor; None = no cache
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self._dispatcher: Dispatcher | None = None  # streaming engines: built with the engine, on first use
        self._answers: list[tuple[str, str]] = []  # cache rows not yet written (see _commit_answers)
        self._answers_lock = threading.Lock()
        self._settled: dict[str, str] = {}  # batch mode: cache key -> final error, known without a request
        self._otherwise: str | None = None  # batch mode: the error of anything else the cache cannot answer
        self.runner = RequestRunner(
            try_num=opts.try_num, retry_backoff=opts.retry_backoff, max_backoff=opts.max_backoff,
            fail_fast=opts.fail_fast, max_cost=opts.max_cost, answer_tokens=answer_budget(opts.sampling_params),
            pricing=self.pricing, stats=self.stats,
        )
        self.loader = ImageLoader(
            limits=FetchLimits(read_timeout=opts.fetch_timeout, max_bytes=opts.max_image_bytes),
            try_num=opts.try_num, workers=opts.image_workers, wait=self.runner.wait,
            geometry={"max_aspect_ratio": opts.max_aspect_ratio, "min_side": opts.min_image_side,
                      "pad_to_aspect": opts.pad_to_aspect, "reencode": opts.reencode_images},
        )

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

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
        if self._otherwise is None:  # settled (batch mode): no request will be sent, so no engine is needed
            _ = self.engine

    def start(self) -> None:
        """Start an engine that streams (its client, on the loader pool) now, while the run plans its batches
        and opens its cache, rather than with the first batch."""
        if self._otherwise is None and self.engine.streams:
            self._dispatch().start_engine()

    def attach_cache(self, cache: AnswerCache | None) -> None:
        self.cache = cache

    def close(self) -> None:
        with self._engine_lock:
            dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            dispatcher.close()
        # The pool before the engine: an engine start still under way on it ends first. Not under the lock, which
        # the pool's loaders take to reach the engine.
        self.loader.close()
        with self._engine_lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()

    def spent(self) -> float:
        """What the answers so far cost, from the tokens the server reported (0 without prices)."""
        return self.runner.spent()

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of everything besides the image and prompt that changes the answer (cache keys, job identity)."""
        o = self.options
        doc = {
            "v": 1,
            "engine": self.engine_kind,
            "model": o.api_or_hf_model,
            "system_prompt": self.system_prompt,
            "sampling_params": o.sampling_params,
            "model_params": {k: v for k, v in o.model_params.items() if k not in CLIENT_PARAMS},
            "schema": self.json_schema,
            "max_pixels": o.max_pixels,
        }
        if o.reencode_images:  # only when set, so the caches of earlier runs keep their keys
            doc["reencode_images"] = True
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def cache_key(self, image_sha256: str, prompt: str) -> str:
        """SHA-256 of the image bytes and of everything else that changes the model's answer."""
        return hashlib.sha256(f"{self.fingerprint}\x00{image_sha256}\x00{prompt}".encode()).hexdigest()

    def provenance(self) -> dict[str, Any]:
        o = self.options
        prompts = (self.system_prompt + "\x00" + self.input_template).encode()
        return {
            "op": self.name,
            "engine": self.engine_kind,
            "model": o.api_or_hf_model,
            "tag_field_name": self.tag_field_name,
            "prompt_sha256": hashlib.sha256(prompts).hexdigest()[:16],
            "sampling_params": o.sampling_params,
            "json_schema": o.json_schema,
            "max_pixels": o.max_pixels,
            "max_tags": o.max_tags,
            "max_tag_length": o.max_tag_length,
        }

    # -- parsing -----------------------------------------------------------------------------------------------

    def parse_output(self, raw: str) -> list[str]:
        """Normalised tags from one raw model answer; raises `TagParseError` (a ValueError) when there are none.
        With a vocabulary, tags are mapped onto it (normalise → map → drop duplicates → first `max_tags`)."""
        return self._finish([self._read_answer(raw)])[0][0]

    def _read_answer(self, raw: str) -> list[str]:
        """Normalised tags; with a vocabulary not yet mapped, so not yet cut to `max_tags` either."""
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
    def _load_vocabulary(opts: TaggerArguments) -> Vocabulary | None:
        if opts.vocabulary is None:
            if opts.synonyms or opts.constrain_to_vocabulary:
                raise ConfigError("image_tagging_vlm_mapper: synonyms/constrain_to_vocabulary need a vocabulary")
            return None
        from vlmtag.tags.vocabulary import Vocabulary  # loads embeddings support: only when asked for

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
        attached = samples.get(BYTES_KEY)
        images_key = o.image_key if o.image_key in samples or attached is None else "images"
        gathered = self.gather(
            images=samples.get(images_key) or [None] * n,
            texts=samples.get(o.text_key) or [None] * n,
            image_bytes=samples.get(o.image_bytes_key) or attached or [None] * n,
            metas=samples.get(META_KEY) or [None] * n,
            base_dir=base_dir,
        )
        samples[META_KEY] = self._tag(gathered, base_dir)
        return samples

    def process_rows(self, rows: list[dict], *, base_dir: str | None = None) -> list[dict]:
        """Tag a list of row dicts (the executors' form); each row keeps exactly its own keys, plus the meta."""
        metas = self._tag(self.gather_rows(rows, base_dir), base_dir)
        self.stats.add(rows_unreadable=sum(INVALID_ROW_KEY in row for row in rows))
        for row, meta in zip(rows, metas):
            row[META_KEY] = meta
        return rows

    def process(self, samples: dict, rank: int | None = None, *args: Any, **kwargs: Any) -> dict:
        """Data-Juicer's entry point: `dataset.map(op.process, batched=True, with_rank=True)` (a batch of columns)
        or `dataset.map(op.process, with_rank=True)` (one sample). `rank` (given positionally by `with_rank`) is
        accepted and not needed: an API engine keeps `concurrency` requests in flight from one process.

        The operator's fields come back as typed NumPy arrays (tags: str arrays; errors: strings with None), so
        that Hugging Face `datasets` and Arrow fix one type for them whatever the first batch holds (a first batch
        without a single error would otherwise type the errors column as null, and a later error would crash the
        writer). `process_batched` returns plain lists."""
        if not samples:
            return samples
        base_dir = kwargs.get("base_dir")
        single = _is_single_sample(samples, self.options.text_key)
        batch = {k: [v] for k, v in samples.items()} if single else samples
        if batch.get(META_KEY) is not None:
            # Arrow gives every row of a struct column every field: None where a row lacks it (not tagged yet)
            batch[META_KEY] = [self._without_null_fields(meta) for meta in batch[META_KEY]]
        out = self.process_batched(batch, base_dir=base_dir)
        out[META_KEY] = [self.arrow_typed(meta) for meta in out[META_KEY]]
        return {k: v[0] for k, v in out.items()} if single else out

    def arrow_typed(self, meta: Any) -> Any:
        """A copy of a row's meta whose tag, error and unmapped fields are NumPy arrays of one fixed type each
        (see `process`). Other fields and metas that are not dicts are left as they are."""
        if not isinstance(meta, dict):
            return meta
        import numpy as np

        meta = dict(meta)
        for name in (self.tag_field_name, self.unmapped_field_name):
            lists = meta.get(name)
            if isinstance(lists, (list, tuple)):
                meta[name] = [np.array([] if t is None else list(t), dtype=np.str_) for t in lists]
        errors = meta.get(self.error_field_name)
        string_dtype = getattr(getattr(np, "dtypes", None), "StringDType", None)  # NumPy >= 2
        if isinstance(errors, (list, tuple)) and string_dtype is not None:
            # a string dtype that holds None: an all-None list is still typed string in Arrow
            meta[self.error_field_name] = np.array(list(errors), dtype=string_dtype(na_object=None))
        return meta

    def _without_null_fields(self, meta: Any) -> Any:
        if not isinstance(meta, dict) or self.tag_field_name not in meta or meta[self.tag_field_name] is not None:
            return meta
        ours = (self.tag_field_name, self.error_field_name, self.unmapped_field_name)
        return {k: v for k, v in meta.items() if k not in ours}

    def __reduce__(self):
        """Pickled as its arguments (Data-Juicer and Hugging Face `datasets` send `op.process` to worker
        processes): the copy builds its own engine and threads on first use, and has no cache attached."""
        return (_rebuild, (type(self), self.spec[1]))

    # -- gather: rows -> distinct images and requests -----------------------------------------------------------

    def gather_rows(self, rows: Sequence[dict], base_dir: str | None) -> Gathered:
        """`gather` for row dicts. Rows are not changed."""
        o = self.options
        return self.gather(
            # readers that attach bytes (WebDataset, Parquet image columns) name them under "images"
            images=[r.get(o.image_key if o.image_key in r or BYTES_KEY not in r else "images") for r in rows],
            texts=[r.get(o.text_key) for r in rows],
            image_bytes=[r.get(o.image_bytes_key) or r.get(BYTES_KEY) for r in rows],
            metas=[r.get(META_KEY) for r in rows],
            base_dir=base_dir,
        )

    def gather(self, *, images: Sequence[Any], texts: Sequence[Any], image_bytes: Sequence[Any],
               metas: Sequence[Any], base_dir: str | None) -> Gathered:
        """The requests a batch needs (columns aligned by row): each distinct image once, each distinct
        (image, prompt) once; rows already tagged are skipped unless `overwrite`."""
        o = self.options
        tokens = (o.image_special_token, o.eoc_special_token)
        separate = self.vocabulary is not None and o.unmapped == "separate"
        g = Gathered(metas=[], sources=[], requests=[], slots=[], skipped=0)
        distinct: dict[tuple, int] = {}  # image key -> index in g.sources
        requests: dict[tuple[int, str], int] = {}  # (image index, prompt) -> index in g.requests
        for i, meta in enumerate(metas):
            meta = {} if meta is None else meta
            if not isinstance(meta, dict) or (self.tag_field_name in meta and not o.overwrite):
                g.skipped += 1
                g.metas.append(meta)
                continue
            meta = dict(meta)
            g.metas.append(meta)
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
            text = clean_text(texts[i], tokens)
            if len(text) > o.max_text_chars:  # a 1 MB caption would cost tokens and may not fit the context
                text, g.prompts_cut = text[: o.max_text_chars], g.prompts_cut + 1
            prompt = fill_template(self.input_template, text)
            for j, path in enumerate(row_images):
                raw = row_bytes[j] if j < len(row_bytes) and row_bytes[j] is not None else None
                source, key = source_and_key(path, raw, base_dir, (i, j))
                img = distinct.setdefault(key, len(g.sources))
                if img == len(g.sources):
                    g.sources.append(source)
                g.slots.append((i, j, requests.setdefault((img, prompt), len(requests))))
        g.requests = list(requests)
        return g

    # -- the work ----------------------------------------------------------------------------------------------

    def _tag(self, g: Gathered, base_dir: str | None) -> list[Any]:
        """The new meta column for a gathered batch: each row's meta with its tag and error fields set."""
        self.stats.add(rows=len(g.metas), rows_skipped=g.skipped, images=len(g.slots), prompts_cut=g.prompts_cut)
        outcomes = self._answer(g.sources, g.requests, base_dir)
        done = [k for k, o in enumerate(outcomes) if o.tags is not None]
        for k, (tags, unmapped) in zip(done, self._finish([outcomes[k].tags for k in done])):
            outcomes[k].tags, outcomes[k].unmapped = tags, unmapped
        return self._scatter(g, outcomes)

    def _scatter(self, g: Gathered, outcomes: list[_Outcome]) -> list[Any]:
        separate = self.vocabulary is not None and self.options.unmapped == "separate"
        for i, j, r in g.slots:
            outcome = outcomes[r]
            meta = g.metas[i]
            if outcome.tags is not None:
                meta[self.tag_field_name][j] = list(outcome.tags)
                if separate:
                    meta[self.unmapped_field_name][j] = list(outcome.unmapped)
                self.stats.add(tagged=1)
            else:
                meta[self.error_field_name][j] = outcome.error
                self.stats.add_failure(outcome.error or "error")
        return g.metas

    def _answer(self, sources: list[Source], requests: list[tuple[int, str]], base_dir: str | None) -> list[_Outcome]:
        """One outcome per distinct (image, prompt): from the cache when it has the answer, else the engine."""
        if self._otherwise is None and self.engine.streams:
            return self._answer_streaming(sources, requests, base_dir)
        return self._answer_in_rounds(sources, requests, base_dir)

    def _answer_streaming(self, sources: list[Source], requests: list[tuple[int, str]],
                          base_dir: str | None) -> list[_Outcome]:
        """`_answer` for engines that stream: each image's request leaves as soon as that image is ready."""
        outcomes = [_Outcome() for _ in requests]
        keys: list[str | None] = [None] * len(requests)
        by_image: list[list[int]] = [[] for _ in sources]
        for r, (img, _) in enumerate(requests):
            by_image[img].append(r)
        images = [(sources[img], [(r, requests[r][1]) for r in rs]) for img, rs in enumerate(by_image) if rs]
        load = functools.partial(self._load_images, outcomes=outcomes, keys=keys, base_dir=base_dir)
        take = functools.partial(self._take_answer, outcomes, keys)
        parallel = self.loader.parallelism(sources, base_dir)
        for r, error in self._dispatch().run(images, load, take, parallel=parallel).items():
            outcomes[r].error = error
        return outcomes

    def _load_images(self, chunk: list[tuple[Source, list[tuple[int, str]]]], *, outcomes: list[_Outcome],
                     keys: list[str | None], base_dir: str | None) -> list[dict[int, tuple[Request, Any]]]:
        """Images of a streamed batch (each with its requests: index, prompt), on a loader thread: read and hash
        them, answer what the cache knows (one look-up for the chunk), prepare each image that is still to ask;
        for each image, its requests still to ask by index, each with the engine's wire form."""
        loaded = [self.loader.load(source, base_dir) for source, _ in chunk]
        self._recall([(r, image, prompt) for image, (_, asks) in zip(loaded, chunk) for r, prompt in asks],
                     outcomes, keys, answering=True)
        engine = self.engine
        results: list[dict[int, tuple[Request, Any]]] = []
        for image, (_, asks) in zip(loaded, chunk):
            work: dict[int, tuple[Request, Any]] = {}
            results.append(work)
            todo = [(r, prompt) for r, prompt in asks if outcomes[r].tags is None and outcomes[r].error is None]
            if not todo or isinstance(image, str):
                continue
            prepared = self.loader.prepare_one(image, self.options.max_pixels)
            for r, prompt in todo:
                if isinstance(prepared, str):
                    outcomes[r].error = prepared
                    continue
                request = Request(image=prepared, system_prompt=self.system_prompt, user_text=prompt)
                try:
                    work[r] = (request, engine.encode(request))
                except ValueError as e:
                    outcomes[r].error = str(e)
        return results

    def _dispatch(self) -> Dispatcher:
        engine = self.engine
        with self._engine_lock:
            if self._dispatcher is None:
                concurrency = self.options.concurrency
                self._dispatcher = Dispatcher(engine, self.runner, concurrency=concurrency,
                                              spawn=self.loader.submit, commit=self._commit_answers)
            return self._dispatcher

    def _answer_in_rounds(self, sources: list[Source], requests: list[tuple[int, str]],
                          base_dir: str | None) -> list[_Outcome]:
        """`_answer` for engines that work in batches: read every image, prepare those to ask, then rounds."""
        loaded = self.loader.read(sources, base_dir)
        outcomes, keys = self._known(loaded, requests, answering=True)
        todo = [r for r, o in enumerate(outcomes) if o.tags is None and o.error is None]
        prepared = self._prepare(loaded, requests, todo)
        work: dict[int, Request] = {}
        for r in todo:
            image = prepared[requests[r][0]]
            if isinstance(image, str):
                outcomes[r].error = image
            elif self._otherwise is not None:
                outcomes[r].error = self._otherwise
            else:
                work[r] = Request(image=image, system_prompt=self.system_prompt, user_text=requests[r][1])
        if work:
            take = functools.partial(self._take_answer, outcomes, keys)
            for r, error in self.runner.run(self.engine, work, take, self._commit_answers).items():
                outcomes[r].error = error
        return outcomes

    def _known(self, loaded: list[ImageBytes | str], requests: list[tuple[int, str]],
               *, answering: bool) -> tuple[list[_Outcome], list[str | None]]:
        """`_recall` for every request of a batch whose images are all read."""
        outcomes = [_Outcome() for _ in requests]
        keys: list[str | None] = [None] * len(requests)
        self._recall([(r, loaded[img], prompt) for r, (img, prompt) in enumerate(requests)], outcomes, keys,
                     answering=answering)
        return outcomes, keys

    def _recall(self, asks: list[tuple[int, ImageBytes | str, str]], outcomes: list[_Outcome],
                keys: list[str | None], *, answering: bool) -> None:
        """What is known of requests (index, image, prompt) without asking: the image's read error, or the cache
        key and, when the cache has a usable answer, the tags. `answering`: the run is answering these requests
        (not exporting them for a batch), so cache hits count and batch mode's settled errors apply."""
        for r, image, prompt in asks:
            if isinstance(image, str):
                outcomes[r].error = image
            else:
                keys[r] = self.cache_key(image.sha256, prompt)
        if self.cache is not None:
            hits = self.cache.get_many(keys[r] for r, _, _ in asks if keys[r])
            for r, _, _ in asks:
                if keys[r] in hits:
                    try:
                        outcomes[r].tags = self._read_answer(hits[keys[r]])
                    except TagParseError:
                        continue  # e.g. stricter max_tag_length now: ask again
                    if answering:
                        self.stats.add(cached=1)
        if answering and self._settled:  # batch mode: the Batch API's final errors, without a request
            for r, _, _ in asks:
                if keys[r] in self._settled and outcomes[r].tags is None:
                    outcomes[r].error = self._settled[keys[r]]

    def _prepare(self, loaded: list[ImageBytes | str], requests: list[tuple[int, str]],
                 todo: Iterable[int]) -> dict[int, EncodedImage | str]:
        """The images of the requests in `todo`, each prepared once, by its index in `loaded`."""
        needed = sorted({requests[r][0] for r in todo})
        return dict(zip(needed, self.loader.prepare([loaded[img] for img in needed], self.options.max_pixels)))

    def _take_answer(self, outcomes: list[_Outcome], keys: list[str | None], r: int, resp: Response) -> Response:
        """Keep a response's tags (and cache the answer); see `requests.TakeAnswer`."""
        if not resp.ok:
            return resp
        try:
            outcomes[r].tags = self._read_answer(resp.text or "")
        except TagParseError as e:
            return Response(error=f"unparsable answer: {e}", retryable=True, usage=resp.usage)
        if self.cache is not None and keys[r] is not None:
            with self._answers_lock:
                self._answers.append((keys[r], resp.text or ""))
        return resp

    def _commit_answers(self) -> None:
        """Write the answers kept since the last commit to the cache, in one transaction. The request runners
        call it before they send more requests, so a crash loses no more answers than requests were in flight."""
        with self._answers_lock:
            rows, self._answers = self._answers, []
        if rows and self.cache is not None:
            self.cache.put_many(rows)

    # -- batch mode (vlmtag.batch): the same requests, answered through a provider's Batch API -----------------

    def batch_requests(self, rows: Sequence[dict], *, base_dir: str | None = None,
                       want: Callable[[str], bool] | None = None) -> BatchWork:
        """What tagging `rows` would ask, without asking: each distinct image+prompt that the cache cannot answer
        and `want(cache key)` accepts, prepared as the engine would receive it. Rows are not changed."""
        g = self.gather_rows(rows, base_dir)
        loaded = self.loader.read(g.sources, base_dir)
        outcomes, keys = self._known(loaded, g.requests, answering=False)
        todo: dict[str, int] = {}
        for r, key in enumerate(keys):
            if key is None or key in todo or outcomes[r].tags is not None or (want is not None and not want(key)):
                continue
            todo[key] = r
        prepared = self._prepare(loaded, g.requests, todo.values())
        work = BatchWork(requests={}, keys=[[] for _ in g.metas])
        for key, r in todo.items():
            image = prepared[g.requests[r][0]]
            if not isinstance(image, str):  # an image that cannot be prepared gets its error in the export
                work.requests[key] = Request(image=image, system_prompt=self.system_prompt, user_text=g.requests[r][1])
        for i, j, r in g.slots:
            row_keys = work.keys[i]
            row_keys.extend([None] * (j + 1 - len(row_keys)))
            row_keys[j] = keys[r]
        return work

    def settle(self, errors: Mapping[str, str], *, otherwise: str | None = None) -> None:
        """Batch mode: outcomes decided elsewhere. An image+prompt whose cache key is in `errors` gets that error
        without a request; with `otherwise`, so does every one the cache cannot answer, and no request (nor
        engine) is made at all."""
        self._settled, self._otherwise = dict(errors), otherwise
