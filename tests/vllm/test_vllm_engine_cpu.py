"""The operator through vlmtag's vLLM engine, on a real vLLM (its CPU build), real photos and a tiny random model.

All tests share the session's one `vllm.LLM` (conftest `vllm_engine`), started from a recipe with `engine: vllm`,
the model folder and `json_schema: true`, with no other model_params: vlmtag's defaults (the engine-level
structured-output config, the CPU memory default) are what make it start and answer. The model's weights are
random, so its free text is gibberish: with the schema every answer must still be valid; without it, every
image must still end with tags or an error record, and rows must stay as they were.
"""

from __future__ import annotations

import json
import re

import pytest

from vlmtag import ImageTaggingVLMMapper
from vlmtag.tags.schema import tag_pattern

pytestmark = pytest.mark.vllm

PHOTOS = ("astronaut.jpg", "coffee.jpg", "chelsea.jpg", "rocket.jpg")


def each_image(rows: list[dict]):
    """(tags, error) for every image of every row, in order."""
    for row in rows:
        meta = row["__dj__meta__"]
        assert len(meta["image_tags"]) == len(meta["image_tags_errors"]) == max(1, len(row.get("images") or []))
        yield from zip(meta["image_tags"], meta["image_tags_errors"])


def test_the_recipe_with_json_schema_and_no_model_params_tags_every_photo(recipe_dir, shared_llm, vllm_engine):
    from vlmtag.config import load_recipe_dict, parse_recipe
    from vlmtag.run import run_recipe

    result = run_recipe(parse_recipe(load_recipe_dict(str(recipe_dir / "recipe.yaml"))))

    rows = [json.loads(line) for line in open(result.export_path)]
    inputs = [json.loads(line) for line in open(recipe_dir / "rows.jsonl")]
    assert [{k: v for k, v in r.items() if k != "__dj__meta__"} for r in rows] == inputs
    pattern = re.compile(tag_pattern(50))
    outcomes = list(each_image(rows))
    assert len(outcomes) == 7
    for tags, error in outcomes:
        assert error is None
        assert 1 <= len(tags) <= 10 and all(pattern.match(t) for t in tags), tags
    assert result.stats.tagged == 7 and result.stats.failed == 0 and result.stats.retries == 0
    # what vlmtag gave vLLM, with nothing in model_params
    args = vllm_engine.llm_args
    assert args["structured_outputs_config"] == {"backend": "xgrammar", "disable_any_whitespace": True}
    assert 0 < args["gpu_memory_utilization"] < 0.92  # fitted to this machine, not vLLM's 0.92


def test_every_answer_under_the_schema_is_valid_json(vllm_engine, photo_dir, crops_dir):
    """The engine's raw answers, not just the parsed tags: each one is JSON that validates against the schema."""
    import jsonschema

    from vlmtag.engines import Request
    from vlmtag.images import load_image

    schema = vllm_engine.settings.json_schema
    files = [photo_dir / n for n in PHOTOS] + sorted(crops_dir.glob("*.jpg"))[:12]
    requests = [Request(image=load_image(str(f)), system_prompt="Tag images.", user_text="Tag this image.")
                for f in files]
    responses = vllm_engine.generate(requests)
    assert len(responses) == len(requests)
    for response in responses:
        assert response.ok, response.error
        jsonschema.validate(json.loads(response.text), schema)
        assert 0 < response.usage.completion_tokens < 256  # it ended by itself, not at the budget


def test_without_the_schema_rows_stay_intact_and_every_image_ends_with_tags_or_an_error(
        shared_llm, vllm_model_dir, photo_dir):
    op = ImageTaggingVLMMapper(
        str(vllm_model_dir), engine="vllm", json_schema=False, max_tags=5, try_num=2, retry_backoff=0,
        sampling_params={"max_tokens": 48},
    )
    rows = [
        {"id": 1, "images": ["astronaut.jpg"], "text": "<__dj__image> a person in a suit"},
        {"id": 2, "images": ["coffee.jpg", "missing.jpg", "chelsea.jpg"], "text": "three, one missing"},
        {"id": 3, "images": [], "text": "no image"},
        {"id": 4, "images": ["rocket.jpg"], "text": None, "extra": {"nested": [1, 2]}},
    ]
    try:
        out = op.process_rows([json.loads(json.dumps(r)) for r in rows], base_dir=str(photo_dir))
    finally:
        op.close()
    assert [{k: v for k, v in r.items() if k != "__dj__meta__"} for r in out] == rows
    outcomes = list(each_image(r for r in out if r["images"]))
    assert len(outcomes) == 5
    for tags, error in outcomes:
        assert (error is None and 1 <= len(tags) <= 5) or (tags == [] and error), (tags, error)
    assert out[1]["__dj__meta__"]["image_tags"][1] == []
    assert "missing.jpg" in out[1]["__dj__meta__"]["image_tags_errors"][1]  # its own index, nothing shifted
    assert out[2]["__dj__meta__"] == {"image_tags": [[]], "image_tags_errors": [None]}
    assert shared_llm.llm_engine is not None  # closing the operator left the shared LLM running


def test_multi_image_rows_stay_aligned_with_a_missing_image_at_its_own_index(shared_llm, vllm_model_dir, photo_dir):
    op = ImageTaggingVLMMapper(str(vllm_model_dir), engine="vllm", json_schema=True, max_tags=3, max_tag_length=12,
                               try_num=1)
    rows = [
        {"id": "a", "images": ["missing-first.jpg", "coffee.jpg", "coffee.jpg"]},
        {"id": "b", "images": ["chelsea.jpg", "rocket.jpg", "missing-last.jpg"]},
        {"id": "c", "images": ["astronaut.jpg"]},
    ]
    try:
        out = op.process_rows([dict(r) for r in rows], base_dir=str(photo_dir))
    finally:
        op.close()
    metas = [r["__dj__meta__"] for r in out]
    errors = [m["image_tags_errors"] for m in metas]
    assert [[e is not None for e in row] for row in errors] == [[True, False, False], [False, False, True], [False]]
    assert "missing-first.jpg" in errors[0][0] and "missing-last.jpg" in errors[1][2]
    tags = [m["image_tags"] for m in metas]
    assert tags[0][0] == [] and tags[1][2] == []
    assert tags[0][1] == tags[0][2] and tags[0][1]  # the same image twice: the same answer, at both places
    assert all(tags[1][0]) and tags[1][1] and tags[2][0]
    assert op.stats.requests == 4  # coffee once, chelsea, rocket, astronaut


def test_one_batch_is_one_llm_chat_call(shared_llm, vllm_model_dir, crops_dir, monkeypatch):
    calls: list[int] = []
    chat = shared_llm.chat

    def counting_chat(conversations, *args, **kwargs):
        calls.append(len(conversations))
        return chat(conversations, *args, **kwargs)

    monkeypatch.setattr(shared_llm, "chat", counting_chat)
    op = ImageTaggingVLMMapper(str(vllm_model_dir), engine="vllm", json_schema=True, max_tags=3, max_tag_length=12,
                               batch_size=64)
    names = sorted(p.name for p in crops_dir.glob("*.jpg"))[:24]
    rows = [{"id": i, "images": [names[i], names[i + 1]]} for i in range(0, 24, 2)]
    try:
        out = op.process_rows(rows, base_dir=str(crops_dir))
    finally:
        op.close()
    assert all(e is None for _, e in each_image(out))
    assert calls == [24]  # 12 rows, 24 distinct images: one call, Data-Juicer would make 24


def test_a_start_failure_says_why_in_one_line_and_which_key_to_change(vllm_model_dir, vllm_engine):
    """vLLM's CPU build refuses to reserve more memory than is free; the cause is logged by its engine process."""
    from vlmtag.engines import EngineError, EngineSettings
    from vlmtag.engines.vllm import VLLMEngine

    settings = EngineSettings(model=str(vllm_model_dir), kind="vllm",
                              model_params={"gpu_memory_utilization": 0.99, "enforce_eager": True})
    with pytest.raises(EngineError) as caught:
        VLLMEngine(settings)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot start vLLM for {str(vllm_model_dir)!r}: ValueError: Available memory on node")
    assert "model_params.gpu_memory_utilization" in message
    assert "See root cause above" not in message
