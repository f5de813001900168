"""Local inference through Hugging Face transformers: the real operator, the real engine, tiny random models, real photos.

The models are built from configs in a fixture (no download). Their weights are random, so their free text is
gibberish: with constrained decoding the answer must still be schema-valid JSON; without it, the operator must
still end every image with tags or an error record.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import pytest

from vlmtag import ImageTaggingVLMMapper
from vlmtag.engines import EngineError, EngineSettings, Request, create_engine
from vlmtag.engines.hf import build_messages, generation_kwargs
from vlmtag.images import EncodedImage, load_image
from vlmtag.tags import tags_json_schema
from vlmtag.tags.schema import tag_pattern

MODELS = ("qwen2_5_vl", "smolvlm")
PHOTOS = ("astronaut.jpg", "coffee.jpg", "chelsea.jpg", "rocket.jpg")


def rows_of_photos() -> list[dict]:
    return [
        {"id": 1, "images": ["astronaut.jpg"], "text": "<__dj__image> a person in a suit"},
        {"id": 2, "images": ["coffee.jpg", "chelsea.jpg"], "text": "two photos"},
        {"id": 3, "images": [], "text": "no image"},
        {"id": 4, "images": ["rocket.jpg"], "text": None, "extra": {"nested": [1, 2]}},
        {"id": 5, "images": ["chelsea.jpg"], "text": "the cat again"},
    ]


def each_image(rows: list[dict]):
    """(tags, error) for every image of every row, in order."""
    for row in rows:
        meta = row["__dj__meta__"]
        for position, _ in enumerate(row["images"]):
            yield meta["image_tags"][position], meta["image_tags_errors"][position]


@pytest.mark.parametrize("model", MODELS)
def test_constrained_decoding_tags_every_photo_with_a_schema_valid_list(model, tiny_vlm_dirs, photo_dir):
    op = ImageTaggingVLMMapper(
        str(tiny_vlm_dirs[model]), engine="hf", json_schema=True, max_tags=3, max_tag_length=8,
        sampling_params={"max_new_tokens": 128},
    )
    try:
        rows = op.process_rows(rows_of_photos(), base_dir=str(photo_dir))
    finally:
        op.close()

    assert op.engine_kind == "hf"
    pattern = re.compile(tag_pattern(8))
    results = list(each_image(rows))
    assert len(results) == 5
    for tags, error in results:
        assert error is None
        assert 1 <= len(tags) <= 3
        assert all(pattern.fullmatch(t) for t in tags), tags
    assert rows[2]["__dj__meta__"] == {"image_tags": [[]], "image_tags_errors": [None]}
    assert op.stats.requests == 5  # one attempt each: nothing needed a retry
    assert op.stats.completion_tokens > 0 and op.stats.prompt_tokens > 0


@pytest.mark.parametrize("model", MODELS)
def test_free_text_ends_each_photo_with_tags_or_an_error_and_keeps_rows(model, tiny_vlm_dirs, photo_dir):
    op = ImageTaggingVLMMapper(
        str(tiny_vlm_dirs[model]), engine="hf", json_schema=False, max_tags=5, try_num=2, retry_backoff=0,
        sampling_params={"max_new_tokens": 24},
    )
    before = rows_of_photos()
    try:
        rows = op.process_rows(rows_of_photos(), base_dir=str(photo_dir))
    finally:
        op.close()

    assert [{k: v for k, v in r.items() if k != "__dj__meta__"} for r in rows] == before
    for tags, error in each_image(rows):
        if error is None:
            assert 1 <= len(tags) <= 5 and all(isinstance(t, str) and t == t.strip() and t for t in tags)
        else:
            assert tags == [] and isinstance(error, str) and error
    assert op.stats.tagged + op.stats.failed == 5


# -- the engine on its own ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_requests(photo_dir) -> list[Request]:
    return [
        Request(image=load_image(str(photo_dir / name), max_pixels=200_000), system_prompt="Tag images.",
                user_text=f"Tag this image ({name}).")
        for name in PHOTOS
    ]


@pytest.fixture(scope="module")
def engines(tiny_vlm_dirs):
    """model name -> an HF engine on that tiny model (constrained to 3 tags of <= 8 characters), built once."""
    built = {}

    def get(model: str):
        if model not in built:
            built[model] = create_engine(EngineSettings(
                model=str(tiny_vlm_dirs[model]), kind="hf", json_schema=tags_json_schema(3, 8),
                model_params={"batch_size": 4}, sampling_params={"max_new_tokens": 64},
            ))
        return built[model]

    yield get
    for engine in built.values():
        engine.close()


@pytest.fixture(scope="module")
def qwen_engine(engines):
    return engines("qwen2_5_vl")


@pytest.mark.parametrize("model", MODELS)
def test_a_batch_answers_like_one_image_at_a_time(model, engines, photo_requests):
    engine = engines(model)
    batched = engine.generate(photo_requests)
    alone = [engine.generate([r])[0] for r in photo_requests]
    assert [r.text for r in batched] == [r.text for r in alone]  # left padding changes nothing
    for response in batched:
        assert response.ok and set(json.loads(response.text)) == {"tags"}


def test_a_broken_image_fails_alone(qwen_engine, photo_requests):
    broken = Request(image=EncodedImage(data=b"not a jpeg", mime="image/jpeg", width=10, height=10),
                     system_prompt="", user_text="Tag this image.")
    responses = qwen_engine.generate([photo_requests[0], broken, photo_requests[1]])
    assert [r.ok for r in responses] == [True, False, True]
    assert "cannot decode image" in responses[1].error and not responses[1].retryable


def test_concurrent_callers_get_their_own_answers(qwen_engine, photo_requests):
    expected = [r.text for r in qwen_engine.generate(photo_requests)]
    results: dict[int, list] = {}

    def call(i: int) -> None:
        results[i] = [r.text for r in qwen_engine.generate(photo_requests[i:] + photo_requests[:i])]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, texts in results.items():
        assert texts == expected[i:] + expected[:i]


def test_a_model_that_is_not_here_fails_at_build_with_one_clear_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # The hub "unreachable": a closed port on loopback. Nothing leaves this machine.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(EngineError) as e:
        create_engine(EngineSettings(model="someone/no-such-vlm", kind="hf"))
    message = str(e.value)
    assert "\n" not in message
    assert "'someone/no-such-vlm'" in message and str(tmp_path / "hub-cache") in message
    assert "could not be reached" in message and "api_or_hf_model" in message and "is_api_model" in message

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EngineError, match="offline mode"):
        create_engine(EngineSettings(model="someone/no-such-vlm", kind="hf"))
    with pytest.raises(EngineError, match="does not exist"):
        create_engine(EngineSettings(model=str(tmp_path / "no-such-folder"), kind="hf"))


def test_import_vlmtag_loads_no_inference_library():
    code = ("import sys, vlmtag, vlmtag.engines.hf, vlmtag.engines.vllm; "
            "print([m for m in ('torch', 'transformers', 'xgrammar', 'vllm') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- pure functions ----------------------------------------------------------------------------------------


def test_generation_is_greedy_and_capped_unless_asked_otherwise():
    assert generation_kwargs({}) == {"max_new_tokens": 256, "do_sample": False}
    assert generation_kwargs({"temperature": 0.0, "top_p": 0.9, "max_tokens": 40}) == {
        "max_new_tokens": 40, "do_sample": False,
    }
    assert generation_kwargs({"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 16, "repetition_penalty": 1.05}) == {
        "max_new_tokens": 16, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.05,
    }
    assert generation_kwargs({"top_k": 20})["do_sample"] is True
    assert generation_kwargs({"do_sample": False, "temperature": 1.0})["do_sample"] is False
    assert "presence_penalty" not in generation_kwargs({"presence_penalty": 0.5, "seed": 1})


def test_messages_put_text_before_the_image_like_the_api_engine():
    image = EncodedImage(data=b"", mime="image/jpeg", width=1, height=1)
    assert build_messages(Request(image=image, system_prompt="sys", user_text="hi")) == [
        {"role": "system", "content": [{"type": "text", "text": "sys"}]},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image"}]},
    ]
    assert [m["role"] for m in build_messages(Request(image=image, system_prompt="", user_text="hi"))] == ["user"]
