"""vlmtag's API engine against vLLM's own OpenAI-compatible server (its CPU build) on loopback.

The session's one server (conftest `vllm_server`) hosts the tiny random Qwen2.5-VL folder. Answers are
gibberish, so the tests check what a user relies on: `json_schema: true` answers are valid within the bounded
schema, 32 requests in flight come back complete and each with its own request's answer, and a server stopped
mid-run leaves per-image errors that a rerun against the restarted server fills in, with every row exactly once.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time

import pytest

from vlmtag import ImageTaggingVLMMapper
from vlmtag.tags.schema import tag_pattern

pytestmark = pytest.mark.vllm

PHOTOS = ("astronaut.jpg", "coffee.jpg", "chelsea.jpg", "rocket.jpg")
GREEDY = {"temperature": 0.0}  # the hard case for constrained decoding: a loop of whitespace is never sampled away


def api_op(server, **kw) -> ImageTaggingVLMMapper:
    kw.setdefault("sampling_params", dict(GREEDY))
    return ImageTaggingVLMMapper(
        server.model, is_api_model=True,
        model_params={"base_url": server.base_url, "api_key": "EMPTY", "timeout": 120},
        **kw,
    )


def test_json_schema_answers_through_the_server_are_valid(vllm_server, photo_dir, crops_dir):
    import jsonschema

    from vlmtag.engines import EngineSettings, Request, create_engine
    from vlmtag.images import load_image
    from vlmtag.tags import tags_json_schema

    # the engine's raw answers
    schema = tags_json_schema(3, 12)
    settings = EngineSettings(model=vllm_server.model, kind="api", concurrency=8, json_schema=schema,
                              model_params={"base_url": vllm_server.base_url, "api_key": "EMPTY"},
                              sampling_params={**GREEDY, "max_tokens": 96})
    files = [photo_dir / n for n in PHOTOS] + sorted(crops_dir.glob("*.jpg"))[:12]
    requests = [Request(image=load_image(str(f)), system_prompt="Tag images.", user_text="Tag this image.")
                for f in files]
    with create_engine(settings) as engine:
        responses = engine.generate(requests)
    for response in responses:
        assert response.ok, response.error
        jsonschema.validate(json.loads(response.text), schema)
        assert 0 < response.usage.completion_tokens < 96

    # the operator, rows of real photos
    op = api_op(vllm_server, json_schema=True, max_tags=3, max_tag_length=12, try_num=1)
    rows = [{"id": 1, "images": ["astronaut.jpg", "coffee.jpg"]}, {"id": 2, "images": ["chelsea.jpg", "rocket.jpg"]}]
    try:
        out = op.process_rows([dict(r) for r in rows], base_dir=str(photo_dir))
    finally:
        op.close()
    pattern = re.compile(tag_pattern(12))
    for row in out:
        meta = row["__dj__meta__"]
        assert meta["image_tags_errors"] == [None, None]
        for tags in meta["image_tags"]:
            assert 1 <= len(tags) <= 3 and all(pattern.match(t) for t in tags), tags


@contextlib.contextmanager
def server_load(server):
    """Samples the server's own count of requests (running + waiting) from its /metrics while the block runs;
    yields a one-item list holding the peak."""
    import httpx

    peak, stop = [0.0], threading.Event()
    gauge = re.compile(r"^vllm:num_requests_(?:running|waiting)\{[^}]*\} ([0-9.]+)", re.MULTILINE)

    def sample() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    text = client.get(server.base_url.removesuffix("/v1") + "/metrics").text
                    peak[0] = max(peak[0], sum(float(v) for v in gauge.findall(text)))
                time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join(timeout=30)


def test_32_requests_in_flight_lose_nothing_and_answer_each_its_own_request(vllm_server, crops_dir):
    """64 different images with prompts of 64 different lengths, 32 at a time: every request gets an answer, and
    the prompt size the server reports for it grows with the request's own prompt (a swapped answer would not)."""
    from vlmtag.engines import EngineSettings, Request, create_engine
    from vlmtag.images import load_image

    settings = EngineSettings(model=vllm_server.model, kind="api", concurrency=32,
                              model_params={"base_url": vllm_server.base_url, "api_key": "EMPTY"},
                              sampling_params={**GREEDY, "max_tokens": 16})
    files = sorted(crops_dir.glob("*.jpg"))
    assert len(files) == 64
    requests = [Request(image=load_image(str(f)), system_prompt="Tag images.",
                        user_text="Tag this image." + " cat" * i) for i, f in enumerate(files)]
    with server_load(vllm_server) as peak, create_engine(settings) as engine:
        responses = engine.generate(requests)
    assert 16 <= peak[0] <= 32, peak  # the server really had many requests at once, never more than 32
    assert len(responses) == 64
    assert all(r.ok for r in responses), [r.error for r in responses if not r.ok][:3]
    prompt_tokens = [r.usage.prompt_tokens for r in responses]
    assert all(b > a for a, b in zip(prompt_tokens, prompt_tokens[1:])), prompt_tokens

    # the same through the operator: 64 images in 32 rows of two, all in one batch with 32 in flight
    op = api_op(vllm_server, concurrency=32, json_schema=True, max_tags=3, max_tag_length=12, try_num=1,
                sampling_params={**GREEDY, "max_tokens": 64})
    rows = [{"id": i, "images": [files[2 * i].name, files[2 * i + 1].name]} for i in range(32)]
    try:
        out = op.process_rows([dict(r) for r in rows], base_dir=str(crops_dir))
    finally:
        op.close()
    assert [r["id"] for r in out] == list(range(32))
    assert all(r["__dj__meta__"]["image_tags_errors"] == [None, None] for r in out)
    assert all(all(tags) for r in out for tags in r["__dj__meta__"]["image_tags"])
    assert op.stats.requests == 64


def test_a_server_stopped_mid_run_gives_per_image_errors_and_a_clean_resume(vllm_server, crops_dir, tmp_path):
    from tier_helpers import write_recipe, write_rows

    from vlmtag.config import load_recipe_dict, parse_recipe
    from vlmtag.run import run_recipe

    files = sorted(crops_dir.glob("*.jpg"))[:48]
    rows = [{"id": i, "images": [str(f)], "text": f"row {i}"} for i, f in enumerate(files[:40])]
    rows += [{"id": 40 + i, "images": [str(files[40 + 2 * i]), str(files[41 + 2 * i])]} for i in range(4)]
    write_rows(tmp_path / "rows.jsonl", rows)
    recipe_path = write_recipe(tmp_path, tmp_path / "rows.jsonl", tmp_path / "out" / "tagged.jsonl", {
        "api_or_hf_model": vllm_server.model, "is_api_model": True,
        "model_params": {"base_url": vllm_server.base_url, "api_key": "EMPTY", "timeout": 60},
        "sampling_params": {**GREEDY, "max_tokens": 64},
        "json_schema": True, "max_tags": 3, "max_tag_length": 12,
        "batch_size": 8, "concurrency": 4, "try_num": 2, "retry_backoff": 0, "fail_fast": False,
    })
    recipe = parse_recipe(load_recipe_dict(str(recipe_path)))

    def stop_after_the_first_batch(stats) -> None:
        if stats.rows_processed >= 8 and vllm_server.proc is not None:
            vllm_server.stop()

    try:
        first = run_recipe(recipe, progress=stop_after_the_first_batch)
    finally:
        if vllm_server.proc is None:
            vllm_server.start()  # the session's server again, same port, for this test's rerun and the next tests

    def export() -> list[dict]:
        return [json.loads(line) for line in open(first.export_path)]

    images = 48
    assert first.stats.completed and first.stats.rows == 44 and first.stats.images == images
    assert 8 <= first.stats.tagged < images and first.stats.tagged + first.stats.failed == images
    out = export()
    assert [r["id"] for r in out] == [r["id"] for r in rows]  # every row once, in order, failed or not
    errors = [e for r in out for e in r["__dj__meta__"]["image_tags_errors"] if e]
    assert len(errors) == first.stats.failed
    assert all("attempt" in e or "connect" in e.lower() for e in errors), errors[:3]

    second = run_recipe(recipe)
    assert second.stats.requests == first.stats.failed  # only the failed images cost a request
    assert second.stats.tagged == images and second.stats.failed == 0
    out = export()
    assert [{k: v for k, v in r.items() if k != "__dj__meta__"} for r in out] == rows
    assert all(e is None for r in out for e in r["__dj__meta__"]["image_tags_errors"])
    assert all(all(tags) for r in out for tags in r["__dj__meta__"]["image_tags"])
