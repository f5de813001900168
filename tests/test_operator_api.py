"""The operator end to end against a real OpenAI-compatible HTTP server on loopback, with injected faults.

Each row's text names the tags the server answers for it ("say: a b c"), so every test can assert exact tags
at exact positions.
"""

from __future__ import annotations

import http.server
import io
import json
import logging
import os
import threading
import time

import pytest
from PIL import Image

import taggers
from openai_server import Reply, say, user_text
from vlmtag import ImageTaggingVLMMapper, RunAborted
from vlmtag.cli import main

SECRET = "sk-test-SECRET-key-123456"


def make_op(server, **kw) -> ImageTaggingVLMMapper:
    return taggers.make_op(server, api_key=SECRET, **kw)


def row(*images, text="say: cat sofa", **extra) -> dict:
    return {"images": list(images), "text": text, **extra}


def write_recipe(tmp_path, photo_dir, model_params: dict, **options) -> str:
    """A recipe for 8 rows of coffee.jpg ("say: t0" ... "say: t7"), in batches of 2, exported to out.jsonl."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"images": [str(photo_dir / "coffee.jpg")], "text": f"say: t{i}"}) + "\n"
                            for i in range(8)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "dataset_path": str(data), "export_path": str(tmp_path / "out.jsonl"),
        "process": [{"image_tagging_vlm_mapper": {
            "api_or_hf_model": "test-model", "is_api_model": True, "batch_size": 2, **options,
            "model_params": model_params}}]}))
    return str(recipe)


def run_rows(op, rows, base_dir):
    try:
        return op.process_rows(rows, base_dir=str(base_dir))
    finally:
        op.close()


def test_tags_land_at_exact_positions_and_rows_keep_order(server, photo_dir):
    op = make_op(server)
    rows = [
        row("coffee.jpg", text="<__dj__image> say: coffee-cup saucer"),
        row("chelsea.jpg", "rocket.jpg", "chelsea.jpg", text="<__dj__image> say: multi image <|__dj__eoc|>"),
        row(text="say: nothing"),
        {"text": "no images key at all"},
        {"images": None, "text": "null images"},
        row("astronaut.jpg", text="say: x", __dj__meta__={"image_tags": [["kept"]], "other": 1}),
        row("rocket.jpg", text="say: Rocket LAUNCH  Pad"),
    ]
    before = json.loads(json.dumps(rows))
    out = run_rows(op, rows, photo_dir)
    assert len(out) == len(before)
    for a, b in zip(before, out):
        assert {k: v for k, v in b.items() if k != "__dj__meta__"} == {k: v for k, v in a.items() if k != "__dj__meta__"}
    metas = [r["__dj__meta__"] for r in out]
    assert metas[0] == {"image_tags": [["coffee-cup", "saucer"]], "image_tags_errors": [None]}
    assert metas[1]["image_tags"] == [["multi", "image"]] * 3
    assert metas[1]["image_tags_errors"] == [None, None, None]
    assert metas[2] == metas[3] == metas[4] == {"image_tags": [[]], "image_tags_errors": [None]}
    assert metas[5] == {"image_tags": [["kept"]], "other": 1}  # already tagged: untouched
    assert metas[6]["image_tags"] == [["rocket", "launch", "pad"]]
    # special tokens never reach the model; duplicates of one image in a row cost one request
    texts = [user_text(b) for b in server.bodies]
    assert not any("<__dj__image>" in t or "<|__dj__eoc|>" in t for t in texts)
    assert server.count == 4
    assert op.stats.images == 5 and op.stats.tagged == 5 and op.stats.rows_skipped == 1


def test_columnar_process_batched_and_process_single(server, photo_dir):
    op = make_op(server)
    batch = {"images": [["coffee.jpg"], []], "text": ["say: a b", "say: c"], "id": [1, 2]}
    out = op.process_batched(batch, base_dir=str(photo_dir))
    assert out["id"] == [1, 2]
    assert [m["image_tags"] for m in out["__dj__meta__"]] == [[["a", "b"]], [[]]]
    single = op.process_single({"images": ["chelsea.jpg"], "text": "say: one"}, base_dir=str(photo_dir))
    op.close()
    assert single["__dj__meta__"]["image_tags"] == [["one"]]


@pytest.mark.parametrize(
    "fault",
    [
        Reply.rate_limited(0.05),
        Reply.server_error(500),
        Reply.unavailable(),
        Reply.slow(3.0),
        Reply.dropped(),
        Reply.not_json(),
        Reply.no_choices(),
        Reply.text("Sure! Here are some tags: cat, sofa."),
    ],
    ids=["429-retry-after", "500", "503", "slower-than-timeout", "dropped", "not-json", "empty-choices", "prose"],
)
def test_each_transient_fault_is_retried_then_tagged(server, photo_dir, fault):
    server.script(fault)
    op = make_op(server, model_params={"base_url": server.base_url, "timeout": 1})
    out = run_rows(op, [row("coffee.jpg", text="say: cat sofa")], photo_dir)
    assert out[0]["__dj__meta__"] == {"image_tags": [["cat", "sofa"]], "image_tags_errors": [None]}
    assert server.count == 2 and op.stats.retries == 1 and op.stats.requests == 2


def test_fenced_and_thinking_answers_parse_first_time(server, photo_dir):
    server.script(Reply.fenced(["Red Car", "street"]), Reply.think(["blue sky"]))
    op = make_op(server)
    out = run_rows(op, [row("coffee.jpg", text="say: a"), row("rocket.jpg", text="say: b")], photo_dir)
    got = sorted(r["__dj__meta__"]["image_tags"][0] for r in out)
    assert got == [["blue-sky"], ["red-car", "street"]]
    assert server.count == 2


def test_retry_after_is_honoured(server, photo_dir):
    server.script(Reply.rate_limited(0.6))
    op = make_op(server, retry_backoff=0)
    import time

    t0 = time.perf_counter()
    run_rows(op, [row("coffee.jpg")], photo_dir)
    assert time.perf_counter() - t0 >= 0.6  # waited at least what the server asked (a floor, not a timing claim)


def test_attempt_budget_is_try_num_and_the_error_says_why(server, photo_dir):
    server.behaviour = lambda body, attempt: Reply.server_error(503, "overloaded") if "fail" in user_text(body) else say(body, attempt)
    op = make_op(server, try_num=3)
    out = run_rows(op, [row("coffee.jpg", text="say: ok"), row("rocket.jpg", text="fail please")], photo_dir)
    assert out[0]["__dj__meta__"]["image_tags"] == [["ok"]]
    assert out[1]["__dj__meta__"]["image_tags"] == [[]]
    error = out[1]["__dj__meta__"]["image_tags_errors"][0]
    assert error.startswith("HTTP 503") and "after 3 attempts" in error
    assert server.count == 1 + 3
    assert op.stats.failed == 1 and op.stats.failure_reasons == {"HTTP 503": 1}


def test_unparsable_answers_use_the_attempt_budget(server, photo_dir):
    server.behaviour = lambda body, attempt: Reply.text("I see a cat and a dog.")
    op = make_op(server, try_num=2)
    out = run_rows(op, [row("coffee.jpg")], photo_dir)
    assert out[0]["__dj__meta__"]["image_tags"] == [[]]
    assert out[0]["__dj__meta__"]["image_tags_errors"][0].startswith("unparsable answer")
    assert server.count == 2


def test_client_errors_fail_at_once_with_the_server_message(server, photo_dir):
    server.script(Reply.error(400, "image too small for this model"))
    op = make_op(server)
    out = run_rows(op, [row("coffee.jpg", text="say: x"), row("rocket.jpg", text="say: y")], photo_dir)
    errors = [r["__dj__meta__"]["image_tags_errors"][0] for r in out]
    tags = [r["__dj__meta__"]["image_tags"][0] for r in out]
    assert sorted(filter(None, errors)) == ["HTTP 400: image too small for this model"]
    assert sorted(tags) == [[], ["x"]] or sorted(tags) == [[], ["y"]]
    assert server.count == 2  # no retry of a 400


def test_bad_images_fail_alone_while_the_rest_is_tagged(server, photo_dir, tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("just some text, not an image")
    good = (photo_dir / "coffee.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 3])
    buf = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buf, "PNG")
    (tmp_path / "bomb.png").write_bytes(buf.getvalue())
    (tmp_path / "coffee.jpg").write_bytes(good)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *a):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        bad = ["zero.jpg", "text.jpg", "truncated.jpg", "bomb.png", "missing.jpg",
               f"http://127.0.0.1:{files.server_port}/nope.jpg", "file:///etc/passwd"]
        op = make_op(server)
        out = run_rows(op, [row("coffee.jpg", *bad, "coffee.jpg", text="say: good")], tmp_path)
    finally:
        files.shutdown()
    meta = out[0]["__dj__meta__"]
    assert meta["image_tags"][0] == meta["image_tags"][-1] == ["good"]
    assert meta["image_tags"][1:-1] == [[]] * len(bad)
    errors = meta["image_tags_errors"]
    assert errors[0] is None and errors[-1] is None
    assert all(isinstance(e, str) and e for e in errors[1:-1]), errors
    assert "404" in errors[6] and "file" in errors[7]
    assert "bomb" in errors[4].lower() or "too large" in errors[4].lower()
    assert server.count == 1  # the good image, sent once


def test_fail_fast_on_a_bad_key(server, photo_dir):
    server.behaviour = lambda body, attempt: Reply.unauthorized()
    op = make_op(server)
    rows = [row("coffee.jpg", text=f"say: t{i}") for i in range(10)]
    with pytest.raises(RunAborted, match="HTTP 401"):
        run_rows(op, rows, photo_dir)


def test_fail_fast_when_nearly_everything_fails(server, photo_dir):
    server.behaviour = lambda body, attempt: Reply.error(422, "unsupported")
    op = make_op(server)
    rows = [row("coffee.jpg", text=f"say: t{i}") for i in range(60)]
    with pytest.raises(RunAborted, match="of the last"):
        run_rows(op, rows, photo_dir)


def test_building_the_operator_touches_no_network(server):
    ImageTaggingVLMMapper("m", is_api_model=True, model_params={"base_url": server.base_url})
    ImageTaggingVLMMapper("m", is_api_model=True, model_params={"base_url": "http://127.0.0.1:9/v1"})
    assert server.count == 0


def test_json_schema_is_sent_with_finishable_bounds(server, photo_dir):
    op = make_op(server, json_schema=True, max_tags=4, max_tag_length=20)
    run_rows(op, [row("coffee.jpg")], photo_dir)
    fmt = server.bodies[0]["response_format"]
    assert fmt["type"] == "json_schema"
    tags = fmt["json_schema"]["schema"]["properties"]["tags"]
    assert tags["maxItems"] == 4 and tags["minItems"] == 1
    assert tags["items"]["pattern"] == "^[a-z0-9][a-z0-9-]{0,19}$"


def test_cli_run_aborts_with_exit_1_keeps_finished_batches_and_hides_the_key(server, photo_dir, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    recipe = write_recipe(tmp_path, photo_dir, {"base_url": server.base_url, "api_key": "${VLMTAG_TEST_KEY}"},
                          retry_backoff=0.01)
    calls = {"n": 0}

    def first_ok_then_401(body, attempt):
        calls["n"] += 1
        return say(body, attempt) if calls["n"] <= 2 else Reply.unauthorized(f"bad key {SECRET}")

    server.behaviour = first_ok_then_401
    import os

    os.environ["VLMTAG_TEST_KEY"] = SECRET
    try:
        code = main(["run", "--config", recipe])
    finally:
        del os.environ["VLMTAG_TEST_KEY"]
    captured = capsys.readouterr()
    assert code == 1
    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"
    assert "run aborted" in captured.out and "HTTP 401" in captured.out
    assert not (tmp_path / "out.jsonl").exists()
    # the key is in no output, log or file the run left behind (job state and cache included)
    for text in (captured.out, captured.err, caplog.text):
        assert SECRET not in text
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name not in ("r.yaml",)]
    assert any("chunks" in str(p) for p in written)  # finished batches were kept for the resume
    for p in written:
        assert SECRET.encode() not in p.read_bytes(), p


@pytest.mark.timeout(60, method="thread")  # a hang ends the session (batch threads would block its exit)
def test_an_engine_that_cannot_start_stops_the_run_and_says_why(photo_dir, tmp_path, monkeypatch, capsys):
    # An https endpoint with a CA bundle that is not there: the client cannot be built. The run must say so and
    # end, not wait for answers that can never come.
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing-ca.pem"))
    recipe = write_recipe(tmp_path, photo_dir, {"base_url": "https://127.0.0.1:9/v1", "api_key": SECRET})
    code = main(["run", "--config", recipe])
    captured = capsys.readouterr()
    assert code == 2
    assert "cannot start the API client" in captured.err and "missing-ca.pem" not in captured.out
    assert not (tmp_path / "out.jsonl").exists()
    assert SECRET not in captured.out + captured.err


def test_api_key_from_environment(server, photo_dir, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    op = ImageTaggingVLMMapper("test-model", is_api_model=True)
    out = run_rows(op, [row("coffee.jpg", text="say: from-env")], photo_dir)
    assert out[0]["__dj__meta__"]["image_tags"] == [["from-env"]]
    assert server.requests[0].headers["authorization"] == "Bearer env-key"


def test_image_urls_that_fail_for_a_moment_are_fetched_again(server, photo_dir):
    good = (photo_dir / "coffee.jpg").read_bytes()
    hits = {"n": 0}

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits["n"] += 1
            if hits["n"] == 1:
                self.send_response(503)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(good)))
            self.end_headers()
            self.wfile.write(good)

        def log_message(self, *a):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        op = make_op(server)
        out = run_rows(op, [row(f"http://127.0.0.1:{files.server_port}/coffee.jpg", text="say: fetched")], photo_dir)
    finally:
        files.shutdown()
    assert out[0]["__dj__meta__"] == {"image_tags": [["fetched"]], "image_tags_errors": [None]}
    assert hits["n"] == 2


def test_an_engine_started_early_is_gone_after_close(server, photo_dir, monkeypatch):
    """`start` (what a run calls after `setup`) starts the API client in the background; a tagger closed at once
    (before or during that start) leaves no client thread behind, and one started again tags as before."""
    for _ in range(3):
        op = make_op(server)
        op.setup()
        op.start()
        op.close()
        assert not [t for t in threading.enumerate() if t.name == "vlmtag-api-engine"]
    # a start still under way when close comes (slowed here): close waits for it, then closes what it started
    from vlmtag.engines.api import ApiEngine

    start = ApiEngine.start
    monkeypatch.setattr(ApiEngine, "start", lambda self: (time.sleep(0.3), start(self)))
    op = make_op(server)
    op.setup()
    op.start()
    time.sleep(0.05)  # the pool has taken the start
    op.close()
    assert not [t for t in threading.enumerate() if t.name == "vlmtag-api-engine"]
    monkeypatch.undo()
    op = make_op(server)
    op.setup()
    op.start()
    out = run_rows(op, [row("coffee.jpg", text="say: red-car street")], photo_dir)
    assert out[0]["__dj__meta__"]["image_tags"] == [["red-car", "street"]]
    assert not [t for t in threading.enumerate() if t.name == "vlmtag-api-engine"]


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling policies")
def test_image_work_runs_as_batch_and_the_engine_thread_does_not(server, photo_dir, monkeypatch):
    """Preparing images is background work (SCHED_BATCH while a loader runs); the engine's event loop, which must
    answer at once, keeps the default policy."""
    from vlmtag.ops.loader import ImageLoader

    seen = []
    prepare_one = ImageLoader.prepare_one

    def recording(self, image, max_pixels):
        engine_threads = [t.native_id for t in threading.enumerate() if t.name == "vlmtag-api-engine"]
        seen.append((os.sched_getscheduler(0), [os.sched_getscheduler(tid) for tid in engine_threads]))
        return prepare_one(self, image, max_pixels)

    monkeypatch.setattr(ImageLoader, "prepare_one", recording)
    op = make_op(server)
    try:
        out = op.process_rows([row("coffee.jpg", text="say: cup"), row("rocket.jpg", text="say: rocket")],
                              base_dir=str(photo_dir))
        # the engine's thread lives until close: its policy, whether or not it existed while images loaded
        engine_after = [os.sched_getscheduler(t.native_id) for t in threading.enumerate()
                        if t.name == "vlmtag-api-engine"]
    finally:
        op.close()
    assert engine_after == [os.SCHED_OTHER]
    assert [r["__dj__meta__"]["image_tags"] for r in out] == [[["cup"]], [["rocket"]]]
    assert len(seen) == 2 and all(policy == os.SCHED_BATCH for policy, _ in seen)
    assert all(engine == [os.SCHED_OTHER] for _, engine in seen if engine)
