"""Data-Juicer's calling conventions, checked without Data-Juicer installed (the `make test-dj` tier runs the real
`dj-process`): the message for a recipe with other operators, `op.process(samples, rank)` as Data-Juicer's
`dataset.map(..., with_rank=True)` calls it, output columns that keep one Arrow type, the operator's explicit
signature for Data-Juicer's preflight, and pickling for worker processes."""

from __future__ import annotations

import inspect
import json
import pickle
import subprocess
import sys

import pyarrow as pa
import yaml

from taggers import make_op
from vlmtag import ImageTaggingVLMMapper
from vlmtag.cli import main
from vlmtag.dj import DJ_OP_NAME, OP_NAME, SERVE_DJ_NAME_ENV, default_cache_path, plugin_path
from vlmtag.dj.signature import DJ_KEYWORD, DJ_POSITIONAL, op_signature, tagger_names
from vlmtag.ops.options import TaggerArguments


def test_a_recipe_with_other_operators_names_them_and_says_how_to_run_it_with_dj_process(tmp_path, capsys, photo_dir):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"images": [str(photo_dir / "coffee.jpg")], "text": "a cup"}) + "\n")
    recipe = {"dataset_path": str(src), "export_path": str(tmp_path / "out.jsonl"), "process": [
        {"text_length_filter": {"min_len": 3}},
        {"image_tagging_vlm_mapper": {"api_or_hf_model": "builtin:default"}},
        {"document_deduplicator": None},
    ]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "'text_length_filter' (process[0]), 'document_deduplicator' (process[2])" in err
    assert "dj-process --config" in err and f"rename {DJ_OP_NAME} to {OP_NAME}" in err
    assert f"{SERVE_DJ_NAME_ENV}=1 dj-process" in err and "pip install 'vlmtag[dj]'" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_process_takes_rank_positionally_and_a_batch_or_one_sample(server, photo_dir):
    op = make_op(server)
    try:
        batch = {"images": [[str(photo_dir / "coffee.jpg")] * 2, []],
                 "text": ["<__dj__image> say: cup saucer", "say: none"],
                 "__dj__meta__": [{}, {}]}
        out = op.process(batch, 0)  # how dataset.map(op.process, batched=True, with_rank=True) calls it
        metas = [json.loads(json.dumps(m, default=lambda a: a.tolist())) for m in out["__dj__meta__"]]
        assert metas == [{"image_tags": [["cup", "saucer"]] * 2, "image_tags_errors": [None, None]},
                         {"image_tags": [[]], "image_tags_errors": [None]}]
        one = op.process({"images": [str(photo_dir / "chelsea.jpg")], "text": "say: cat", "__dj__meta__": {}}, 1)
        assert [list(t) for t in one["__dj__meta__"]["image_tags"]] == [["cat"]]  # map without batched=True
    finally:
        op.close()


def test_output_columns_keep_one_arrow_type_whatever_the_batch_holds(server, photo_dir, tmp_path):
    """Arrow (and so Hugging Face `datasets` under Data-Juicer) fixes a column's type from the first batch: a batch
    without errors, or without any tag at all, must still type the fields as strings."""
    op = make_op(server)
    try:
        clean = op.process({"images": [[str(photo_dir / "coffee.jpg")]], "text": ["say: cup"],
                            "__dj__meta__": [{"source": "a"}]}, 0)
        empty = op.process({"images": [[]], "text": ["say: x"], "__dj__meta__": [{"source": "a"}]}, 0)
        failing = op.process({"images": [[str(tmp_path / "missing.jpg")]], "text": ["say: y"],
                              "__dj__meta__": [{"source": "a"}]}, 0)
    finally:
        op.close()
    types = {pa.array(b["__dj__meta__"]).type for b in (clean, empty, failing)}
    assert types == {pa.struct([("source", pa.string()), ("image_tags", pa.list_(pa.list_(pa.string()))),
                                ("image_tags_errors", pa.list_(pa.string()))])}
    assert pa.array(failing["__dj__meta__"]).to_pylist()[0]["image_tags_errors"][0].startswith("file not found")


def test_a_field_that_arrow_left_null_is_tagged_not_skipped(server, photo_dir):
    """In an Arrow struct column a row without the tag field reads back as `image_tags: None`."""
    op = make_op(server)
    try:
        out = op.process({"images": [[str(photo_dir / "coffee.jpg")]], "text": ["say: cup"],
                          "__dj__meta__": [{"image_tags": None, "image_tags_errors": None, "source": "a"}]}, 0)
    finally:
        op.close()
    meta = pa.array(out["__dj__meta__"]).to_pylist()[0]
    assert meta == {"image_tags": [["cup"]], "image_tags_errors": [None], "source": "a"}


def test_the_operator_pickles_as_its_arguments(server):
    op = make_op(server, concurrency=7, max_tags=4)
    copy = pickle.loads(pickle.dumps(op.process))  # what worker processes receive
    assert copy.__self__.options.concurrency == 7 and copy.__self__.fingerprint == op.fingerprint
    assert copy.__self__ is not op


def test_the_dj_signature_names_every_option_explicitly():
    """Data-Juicer's preflight rejects a recipe key the operator's __init__ does not name; **kwargs is not enough."""
    sig = op_signature({"work_dir": (None, None), "batch_size": (int, 1000), "num_proc": (None, None)})
    params = sig.parameters
    assert list(params)[:3] == ["self", *DJ_POSITIONAL]
    assert list(params)[3:3 + len(DJ_KEYWORD)] == list(DJ_KEYWORD)  # Data-Juicer's own order
    assert set(tagger_names()) == set(TaggerArguments.model_fields) <= set(params)
    assert {"cache_path", "use_cache", "work_dir", "num_proc"} <= set(params)
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values())
    assert params["concurrency"].default == 32 and params["concurrency"].annotation is int
    assert params["batch_size"].default is None  # the adapter chooses it (vlmtag.dj.mapper.default_batch_size)
    assert params["image_special_token"].default is None  # Data-Juicer's recipe-wide token


def test_dj_package_is_light_and_says_where_things_are(tmp_path, monkeypatch):
    code = "import sys, vlmtag.dj, vlmtag.dj.signature; print('data_juicer' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    assert plugin_path().endswith("vlmtag/dj/vlmtag_image_tagging_mapper.py")
    with open(plugin_path()) as f:
        assert "register()" in f.read()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == str(tmp_path / "vlmtag" / "answers.sqlite")
    shown = subprocess.run([sys.executable, "-m", "vlmtag.dj"], capture_output=True, text=True, check=True).stdout
    assert f"custom_operator_paths: ['{plugin_path()}']" in shown and OP_NAME in shown


def test_the_signature_of_the_op_itself_is_still_data_juicers():
    params = inspect.signature(ImageTaggingVLMMapper).parameters
    assert list(params)[:2] == list(DJ_POSITIONAL)
