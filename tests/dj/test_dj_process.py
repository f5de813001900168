"""The real `dj-process` on a recipe with a Data-Juicer filter before vlmtag's tagger and a Data-Juicer mapper
after it, against the loopback OpenAI server: as a user runs it after `pip install 'vlmtag[dj]'`."""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml

from djtier import (DJ_PROCESS, SECRET, Dataset, assert_no_installs, assert_tagged_exactly, dj_env, make_dataset,
                    read_export, recipe, run_dj, tagger_args, write_images)
from openai_server import OpenAIServer, Reply, say

pytestmark = pytest.mark.dj


@pytest.fixture
def server():
    with OpenAIServer() as s:
        s.behaviour = say
        yield s


@pytest.fixture
def dataset(tmp_path) -> Dataset:
    return make_dataset(tmp_path / "data")

MAGIC = {"image/png": b"\x89PNG", "image/jpeg": b"\xff\xd8"}


def assert_true_mime_types(server: OpenAIServer) -> None:
    """Each image's declared MIME type is the format of the bytes sent (Data-Juicer labels PNGs image/jpeg)."""
    for request in server.requests:
        for part in request.body["messages"][-1]["content"]:
            if part["type"] == "image_url":
                url = part["image_url"]["url"]
                mime = url[len("data:"):url.index(";")]
                assert base64.b64decode(url[url.index(",") + 1:]).startswith(MAGIC[mime]), mime


@pytest.mark.parametrize("np_, keep_stats", [(1, True), (2, False)], ids=["np1-stats-in-export", "np2-dj-layout"])
def test_tagger_between_a_dj_filter_and_a_dj_mapper(server, dataset, tmp_path, np_, keep_stats):
    """Batches of 2 rows: the first ones have no failure, a later one has a missing image (Arrow fixes the column
    types from the first batch written; a later error must not crash Data-Juicer's writer)."""
    export = tmp_path / "out" / "tagged.jsonl"
    proc = run_dj(tmp_path, recipe(dataset, export, tagger_args(server, tmp_path), np=np_,
                                   keep_stats_in_res_ds=keep_stats))
    if not keep_stats:  # Data-Juicer's default layout: meta and stats beside the export
        assert '"__dj__meta__"' not in export.read_text()
    assert_tagged_exactly(read_export(export), dataset)
    assert server.count == dataset.distinct_requests  # one per distinct (image, prompt), no retry, no repeat
    assert_true_mime_types(server)  # the PNG sources too (vlmtag re-encodes them, and says what it sends)
    # the key came from ${VLMTAG_TEST_KEY}: sent to the server, never in Data-Juicer's printout
    assert {r.headers["authorization"] for r in server.requests} == {f"Bearer {SECRET}"}
    assert SECRET not in proc.stdout + proc.stderr


def test_dj_ray_executor(server, dataset, tmp_path):
    """Data-Juicer's Ray executor (a local Ray instance): it calls `op.process` on Arrow blocks in Ray tasks and
    writes the export as a folder of JSON files."""
    export = tmp_path / "out" / "tagged.jsonl"
    run_dj(tmp_path, recipe(dataset, export, tagger_args(server, tmp_path), executor_type="ray",
                            ray_address="local"))
    rows = [json.loads(line) for part in sorted(export.iterdir()) for line in part.read_text().splitlines() if line]
    order = {dataset.rows[i]["text"].replace("#", ""): n for n, i in enumerate(dataset.kept)}
    assert_tagged_exactly(sorted(rows, key=lambda r: order[r["text"]]), dataset)


@pytest.mark.parametrize("entry_point", [False, True], ids=["custom-path-only", "custom-path-and-entry-point"])
def test_custom_operator_paths_route(server, dataset, tmp_path, entry_point):
    """The path the README gives (`python -m vlmtag.dj` prints it); with the entry point as well, the operator
    is loaded both ways in one run and nothing fails on "already registered"."""
    from vlmtag.dj import plugin_path

    hide = None if entry_point else (
        "import importlib.metadata as m\n"
        "_all = m.entry_points\n"
        "m.entry_points = lambda **kw: [] if kw.get('group') == 'data_juicer.ops' else _all(**kw)\n"
        "import data_juicer.ops as o\n"
        "assert 'vlmtag_image_tagging_mapper' not in o.OPERATORS.modules\n")
    export = tmp_path / "out" / "tagged.jsonl"
    run_dj(tmp_path, recipe(dataset, export, tagger_args(server, tmp_path), custom_operator_paths=[plugin_path()]),
           python_prelude=hide)
    assert_tagged_exactly(read_export(export), dataset)


def test_opt_in_switch_serves_djs_own_name_with_vlmtag(server, dataset, tmp_path):
    """A recipe written for Data-Juicer's `image_tagging_vlm_mapper`, unchanged, runs vlmtag's implementation when
    VLMTAG_REPLACE_DJ_TAGGER=1 is set; without it Data-Juicer's own operator keeps its name."""
    dj_args = {"api_or_hf_model": "test-model", "is_api_model": True,
               "model_params": {"base_url": server.base_url, "api_key": "sk-test"}}
    export = tmp_path / "out" / "tagged.jsonl"
    run_dj(tmp_path, recipe(dataset, export, {**dj_args, "cache_path": str(tmp_path / "c.sqlite")},
                            op_name="image_tagging_vlm_mapper"),
           env=dj_env(tmp_path, VLMTAG_REPLACE_DJ_TAGGER="1"))
    assert_tagged_exactly(read_export(export), dataset)  # the errors field and alignment are vlmtag's

    check = ("import data_juicer.ops as o; c = o.OPERATORS.modules['image_tagging_vlm_mapper']; "
             "print(c.__module__, c._name)")
    plain = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=dj_env(tmp_path),
                           check=True).stdout.split()
    assert plain == ["data_juicer.ops.mapper.image_tagging_vlm_mapper", "image_tagging_vlm_mapper"]


def test_a_run_level_failure_stops_dj_process_instead_of_dropping_rows(dataset, tmp_path):
    """A wrong API key: vlmtag's fail-fast stops the run with the reason. With Data-Juicer's default
    `skip_op_error: true` a raising operator would have its rows dropped and dj-process would exit 0."""
    with OpenAIServer() as refusing:
        refusing.behaviour = lambda body, attempt: Reply.unauthorized()
        export = tmp_path / "out" / "tagged.jsonl"
        path = tmp_path / "bad-key.yaml"
        path.write_text(yaml.safe_dump(recipe(dataset, export, tagger_args(refusing, tmp_path))))
        proc = subprocess.run([DJ_PROCESS, "--config", str(path)], capture_output=True, text=True, timeout=300,
                              env=dj_env(tmp_path), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "RunAborted: " in proc.stderr and "HTTP 401: Incorrect API key provided" in proc.stderr
    assert not export.exists()


def cached_answers(path) -> int:
    if not os.path.exists(path):
        return 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:  # not created yet
        return 0


def test_answer_cache_rerun_pays_nothing(server, dataset, tmp_path):
    """The default cache path is stable (not Data-Juicer's per-job work_dir): a rerun of the same recipe sends no
    request and writes the same export."""
    export = tmp_path / "out" / "tagged.jsonl"
    tagger = tagger_args(server, tmp_path)
    del tagger["cache_path"]  # the default: $XDG_CACHE_HOME/vlmtag/answers.sqlite
    run_dj(tmp_path, recipe(dataset, export, tagger))
    first = read_export(export)
    assert server.count == dataset.distinct_requests
    assert cached_answers(tmp_path / "xdg-cache" / "vlmtag" / "answers.sqlite") == dataset.distinct_requests
    server.reset()
    run_dj(tmp_path, recipe(dataset, export, tagger))
    assert server.count == 0
    assert read_export(export) == first


def test_after_kill_9_a_rerun_pays_only_for_missing_answers(tmp_path):
    """dj-process killed with SIGKILL in the middle of the tagger: the rerun asks only for the images whose
    answers the cache did not get, and the export is complete and exact."""
    data = tmp_path / "data"
    n = 40
    names = write_images(data / "images", n)
    rows = [{"images": [f"images/{name}"], "text": f"<__dj__image> say: tag{i} common"} for i, name in enumerate(names)]
    (data / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "answers.sqlite"
    with OpenAIServer(latency=0.25) as slow:
        slow.behaviour = say
        tagger = tagger_args(slow, tmp_path, concurrency=2, batch_size=4, cache_path=str(cache))
        job = recipe(data / "data.jsonl", tmp_path / "out" / "tagged.jsonl", tagger)
        path = tmp_path / "kill.yaml"
        path.write_text(yaml.safe_dump(job))
        log = tmp_path / "killed.log"
        with open(log, "w") as out:  # a file, not a pipe: nobody reads while it runs
            proc = subprocess.Popen([DJ_PROCESS, "--config", str(path)], stdout=out, stderr=subprocess.STDOUT,
                                    env=dj_env(tmp_path), cwd=tmp_path, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while cached_answers(cache) < 10:
                assert proc.poll() is None, "dj-process ended before it could be killed:\n" + log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no answers cached in time:\n" + log.read_text()[-3000:]
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert_no_installs(log.read_text())
        before = cached_answers(cache)
        assert 10 <= before < n
        slow.reset()
        export = tmp_path / "out" / "tagged.jsonl"
        run_dj(tmp_path, job)
        assert slow.count == n - before  # only what was missing
    out = read_export(export)
    assert [r["__dj__meta__"]["image_tags"] for r in out] == [[[f"tag{i}", "common"]] for i in range(n)]
    assert all(r["__dj__meta__"]["image_tags_errors"] == [None] for r in out)
