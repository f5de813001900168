"""The vLLM engine's requests and parameters, checked without vLLM or a GPU.

The pure functions are tested directly; the engine itself runs against a stand-in `vllm` module that records
what it was given (the real run needs a GPU: benchmarks/gpu_vllm.py).
"""

from __future__ import annotations

import base64
import importlib.machinery
import importlib.util
import sys
import types
from dataclasses import dataclass

import pytest

from vlmtag.engines import EngineError, EngineSettings, Request, create_engine
from vlmtag.engines.vllm import (
    accepted_fields,
    build_conversation,
    default_max_model_len,
    llm_kwargs,
    response_from_output,
    sampling_kwargs,
    structured_output_field,
)
from vlmtag.images import EncodedImage
from vlmtag.tags import tags_json_schema

IMAGE = EncodedImage(data=b"\xff\xd8jpeg", mime="image/jpeg", width=448, height=336)


def settings(**kw) -> EngineSettings:
    kw.setdefault("model", "Qwen/Qwen2.5-VL-7B-Instruct")
    return EngineSettings(kind="vllm", **kw)


def test_a_conversation_is_system_then_text_and_image_as_a_data_url():
    conversation = build_conversation(Request(image=IMAGE, system_prompt="You tag.", user_text="Tag this."))
    assert conversation[0] == {"role": "system", "content": "You tag."}
    user = conversation[1]
    assert user["role"] == "user" and user["content"][0] == {"type": "text", "text": "Tag this."}
    url = user["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,") and base64.b64decode(url.split(",", 1)[1]) == IMAGE.data
    assert [m["role"] for m in build_conversation(Request(image=IMAGE, system_prompt="", user_text="x"))] == ["user"]


def test_model_params_all_reach_the_llm_with_tagging_defaults():
    s = settings(
        model_params={"tensor_parallel_size": 4, "gpu_memory_utilization": 0.8, "max_model_len": 8192,
                      "mm_processor_kwargs": {"min_pixels": 3136}, "enforce_eager": True},
        max_pixels=448 * 448,
    )
    assert llm_kwargs(s, "/models/qwen") == {
        "model": "/models/qwen",
        "tensor_parallel_size": 4,  # Data-Juicer computed this and dropped it
        "gpu_memory_utilization": 0.8,
        "max_model_len": 8192,
        "enforce_eager": True,
        "limit_mm_per_prompt": {"image": 1},
        "mm_processor_kwargs": {"min_pixels": 3136, "max_pixels": 448 * 448},
    }
    given = llm_kwargs(settings(model_params={"limit_mm_per_prompt": {"image": 2}, "mm_processor_kwargs": {"max_pixels": 1}}))
    assert given["limit_mm_per_prompt"] == {"image": 2} and given["mm_processor_kwargs"] == {"max_pixels": 1}
    assert given["model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert "batch_size" not in llm_kwargs(settings(model_params={"batch_size": 8}))


def test_default_context_fits_one_image_prompt_and_answer():
    assert default_max_model_len(448 * 448, 256) == 4096  # 256 visual tokens: the floor
    assert default_max_model_len(802_816, 256) == 4096  # 1024 visual tokens + 2048 + 256
    assert default_max_model_len(12_845_056, 256) == 19 * 1024  # 16384 visual tokens + 2048 + 256, rounded up
    assert llm_kwargs(settings(max_pixels=12_845_056))["max_model_len"] == 19 * 1024


def test_sampling_is_greedy_and_capped_unless_asked():
    assert sampling_kwargs(settings()) == ({"max_tokens": 256, "temperature": 0.0}, None)
    kwargs, _ = sampling_kwargs(settings(sampling_params={"temperature": 0.7, "top_p": 0.8, "max_tokens": 64, "seed": 3}))
    assert kwargs == {"temperature": 0.7, "top_p": 0.8, "max_tokens": 64, "seed": 3}
    kwargs, _ = sampling_kwargs(settings(sampling_params={"max_new_tokens": 32, "min_new_tokens": 32, "do_sample": False,
                                                          "repetition_penalty": 1.05, "num_beams": 1}))
    assert kwargs == {"max_tokens": 32, "min_tokens": 32, "repetition_penalty": 1.05, "temperature": 0.0}
    kwargs, _ = sampling_kwargs(settings(sampling_params={"top_k": 20}))
    assert "temperature" not in kwargs  # sampling asked for: vLLM's own temperature (1.0) applies


def test_structured_output_uses_the_schema_without_free_whitespace():
    schema = tags_json_schema(5, 20)
    _, structured = sampling_kwargs(settings(json_schema=schema))
    assert structured == {"json": schema, "disable_any_whitespace": True}


@pytest.mark.parametrize(
    "version, field_name",
    [("0.6.6", "guided_decoding"), ("0.11.2", "guided_decoding"), ("0.11.1rc2.dev5+gabc", "guided_decoding"),
     ("0.12.0", "structured_outputs"), ("0.12.0rc1", "structured_outputs"), ("0.33.0", "structured_outputs"),
     ("1.0.0", "structured_outputs")],
)
def test_structured_output_field_follows_the_vllm_version(version, field_name):
    assert structured_output_field(version) == field_name


def test_options_an_older_vllm_lacks_are_left_out():
    @dataclass
    class OldGuidedDecodingParams:
        json: object = None
        backend: str | None = None

    assert accepted_fields(OldGuidedDecodingParams, {"json": {}, "disable_any_whitespace": True}) == {"json": {}}


def test_an_output_becomes_text_and_token_counts():
    output = types.SimpleNamespace(
        prompt_token_ids=list(range(300)),
        outputs=[types.SimpleNamespace(text=' {"tags": ["cat"]}\n', token_ids=[1, 2, 3, 4, 5])],
    )
    response = response_from_output(output)
    assert response.ok and response.text == '{"tags": ["cat"]}'
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (300, 5)
    empty = response_from_output(types.SimpleNamespace(prompt_token_ids=[1], outputs=[]))
    assert not empty.ok and empty.retryable


# -- the engine against a stand-in vllm module ------------------------------------------------------------


@dataclass
class FakeStructuredOutputsParams:
    json: object = None
    disable_any_whitespace: bool = False


class FakeSamplingParams:
    def __init__(self, **kwargs):
        unknown = set(kwargs) - {"max_tokens", "min_tokens", "temperature", "top_p", "top_k", "seed",
                                 "repetition_penalty", "structured_outputs"}
        if unknown:
            raise TypeError(f"unexpected keyword argument {sorted(unknown)[0]!r}")
        self.kwargs = kwargs


class FakeLLM:
    """Records its constructor arguments and every chat() call; a user text of POISON makes chat() raise."""

    last: "FakeLLM"

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        FakeLLM.last = self

    def chat(self, conversations, sampling_params, use_tqdm=True):
        self.calls.append((len(conversations), sampling_params))
        outputs = []
        for conversation in conversations:
            text = conversation[-1]["content"][0]["text"]
            if text == "POISON":
                raise ValueError("bad image")
            outputs.append(types.SimpleNamespace(
                prompt_token_ids=[0] * 10, outputs=[types.SimpleNamespace(text=f'{{"tags": ["{text}"]}}', token_ids=[1, 2])]
            ))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    vllm.__version__ = "0.13.0"
    vllm.LLM, vllm.SamplingParams = FakeLLM, FakeSamplingParams
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.StructuredOutputsParams = FakeStructuredOutputsParams
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    return vllm


def requests_for(*texts: str) -> list[Request]:
    return [Request(image=IMAGE, system_prompt="s", user_text=t) for t in texts]


def test_a_whole_batch_goes_into_one_chat_call(fake_vllm, tmp_path):
    engine = create_engine(settings(model=str(tmp_path), json_schema=tags_json_schema(3, 8),
                                    model_params={"tensor_parallel_size": 2}))
    responses = engine.generate(requests_for("a", "b", "c", "d"))
    llm = FakeLLM.last
    assert [n for n, _ in llm.calls] == [4]
    assert llm.kwargs["tensor_parallel_size"] == 2 and llm.kwargs["model"] == str(tmp_path)
    params = llm.calls[0][1].kwargs
    assert params["temperature"] == 0.0 and params["max_tokens"] == 256
    assert params["structured_outputs"] == FakeStructuredOutputsParams(json=tags_json_schema(3, 8), disable_any_whitespace=True)
    assert [r.text for r in responses] == [f'{{"tags": ["{t}"]}}' for t in "abcd"]
    assert responses[0].usage.prompt_tokens == 10 and responses[0].usage.completion_tokens == 2


def test_one_bad_request_fails_alone(fake_vllm, tmp_path):
    engine = create_engine(settings(model=str(tmp_path)))
    responses = engine.generate(requests_for("a", "POISON", "c"))
    assert [r.ok for r in responses] == [True, False, True]
    assert "bad image" in responses[1].error


def test_bad_sampling_params_fail_at_build(fake_vllm, tmp_path):
    with pytest.raises(EngineError, match="sampling_params not accepted by vLLM 0.13.0"):
        create_engine(settings(model=str(tmp_path), sampling_params={"no_such_option": 1}))


def test_without_vllm_the_engine_says_how_to_get_it(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    with pytest.raises(EngineError, match=r"pip install 'vlmtag\[vllm\]'"):
        create_engine(settings())
