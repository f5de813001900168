"""vlmtag's Data-Juicer operator in-process, the way Data-Juicer's own unit tests and preflight use operators."""

from __future__ import annotations

import inspect
import json

import pytest

from djtier import MISSING, SECRET, tagger_args, write_images
from openai_server import OpenAIServer, say

pytestmark = pytest.mark.dj


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("VLMTAG_TEST_KEY", SECRET)  # tagger_args gives the key as ${VLMTAG_TEST_KEY}


@pytest.fixture
def server():
    with OpenAIServer() as s:
        s.behaviour = say
        yield s

OP_NAME = "vlmtag_image_tagging_mapper"


def dj_op(server, tmp_path, **kw):
    from data_juicer.ops import OPERATORS

    return OPERATORS.modules[OP_NAME](**tagger_args(server, tmp_path, **kw))


def samples(tmp_path):
    names = write_images(tmp_path / "images", 3)
    paths = [str(tmp_path / "images" / n) for n in names]
    return [
        {"images": [paths[0]], "text": "<__dj__image> say: red square", "__dj__meta__": {}},
        {"images": [paths[1], paths[2], paths[1]], "text": "<__dj__image> say: two pics", "__dj__meta__": {}},
        {"images": [], "text": "say: nothing", "__dj__meta__": {}},
    ]


EXPECTED = [[["red", "square"]], [["two", "pics"]] * 3, [[]]]


@pytest.mark.parametrize("batched", [False, True], ids=["dj-unit-test-map", "batched"])
def test_port_of_djs_unit_test_pattern(server, tmp_path, batched):
    """Data-Juicer's test for image_tagging_vlm_mapper: `dataset.map(op.process, num_proc=..., with_rank=True)`
    (rank given positionally), then non-empty tags per image and `[[]]` for a row without images."""
    from data_juicer.core.data import NestedDataset
    from datasets import Dataset

    op = dj_op(server, tmp_path)
    dataset = NestedDataset(Dataset.from_list(samples(tmp_path)))
    kw = {"batched": True, "batch_size": 2} if batched else {}
    res = dataset.map(op.process, num_proc=2, with_rank=True, **kw).to_list()
    assert [r["__dj__meta__"]["image_tags"] for r in res] == EXPECTED
    assert [r["__dj__meta__"]["image_tags_errors"] for r in res] == [[None], [None] * 3, [None]]


def test_djs_pattern_on_vlmtags_plain_op(server, tmp_path):
    """`from vlmtag import ImageTaggingVLMMapper` is usable the way Data-Juicer users call operators too."""
    from datasets import Dataset

    from vlmtag import ImageTaggingVLMMapper

    kw = tagger_args(server, tmp_path)
    for key in ("cache_path", "batch_size"):
        kw.pop(key)
    kw["model_params"]["api_key"] = SECRET
    op = ImageTaggingVLMMapper(**kw)
    res = Dataset.from_list(samples(tmp_path)).map(op.process, batched=True, batch_size=1, with_rank=True).to_list()
    assert [r["__dj__meta__"]["image_tags"] for r in res] == EXPECTED


@pytest.mark.parametrize("num_proc", [1, 2])
def test_clean_first_batch_then_a_failure_keeps_the_column_types(server, tmp_path, num_proc):
    """Data-Juicer's own run path (`op.run`, Hugging Face `datasets` writing batch after batch): the meta struct is
    typed by the first batch, which has no error and rows without images; later batches have a failure."""
    from data_juicer.core.data import NestedDataset
    from datasets import Dataset

    rows = samples(tmp_path)[::-1] + [{"images": [str(tmp_path / MISSING)], "text": "say: gone"}]
    for row in rows:
        row["__dj__meta__"] = {"source": "s"}
    op = dj_op(server, tmp_path, batch_size=1, num_proc=num_proc)
    out = op.run(NestedDataset(Dataset.from_list(rows)))
    meta = out.features["__dj__meta__"]
    assert str(meta["image_tags"]) == "List(List(Value('string')))"
    assert str(meta["image_tags_errors"]) == "List(Value('string'))"
    res = out.to_list()
    assert [r["__dj__meta__"]["image_tags"] for r in res] == EXPECTED[::-1] + [[[]]]
    assert res[-1]["__dj__meta__"]["image_tags_errors"] == [f"file not found: {tmp_path / MISSING}"]


def test_preflight_accepts_every_vlmtag_option_and_names_a_typo(server, tmp_path):
    """Data-Juicer checks recipe keys against the operator's explicit __init__ parameters."""
    from data_juicer.core.preflight import PipelineConfigError, _get_valid_params, pre_instantiation_check
    from data_juicer.ops import OPERATORS

    from vlmtag.ops.options import TaggerArguments

    cls = OPERATORS.modules[OP_NAME]
    valid = _get_valid_params(cls)
    assert set(TaggerArguments.model_fields) | {"cache_path", "use_cache"} <= set(valid)
    every = {name: info.get_default(call_default_factory=True) for name, info in TaggerArguments.model_fields.items()}
    every = {k: v for k, v in every.items() if v is not None}
    pre_instantiation_check([{OP_NAME: every}])
    with pytest.raises(PipelineConfigError, match="concurency"):
        pre_instantiation_check([{OP_NAME: {"concurency": 4}}])
    assert list(inspect.signature(cls).parameters)[:2] == ["api_or_hf_model", "is_api_model"]


def test_its_own_batch_size_keeps_concurrency_requests_in_flight(server, tmp_path):
    """Not Data-Juicer's 1,000 (CPU) or 10 (CUDA): at least 256 rows and two rounds of `concurrency`."""
    from data_juicer.ops import OPERATORS

    kw = tagger_args(server, tmp_path)
    del kw["batch_size"]
    cls = OPERATORS.modules[OP_NAME]
    assert cls(**kw).batch_size == 256
    assert cls(**kw, concurrency=300).batch_size == 600
    assert cls(**kw, batch_size=5).batch_size == 5
    with pytest.raises(Exception, match="concurrency"):
        cls(**kw, concurrency="many")
    json.dumps(cls(**kw)._tagger.spec[1])  # its arguments are plain data (what worker processes rebuild it from)
