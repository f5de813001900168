"""The API engine against a real loopback OpenAI-compatible server: what it sends, how it reads answers,
how each failure is classified, and that it stays within its concurrency from any number of threads."""

from __future__ import annotations

import email.utils
import io
import json
import logging
import threading
import time

import pytest
from PIL import Image

from openai_server import OpenAIServer, Reply, default_tags, image_sha, tags_content
from vlmtag.defaults import DEFAULT_MAX_TOKENS
from vlmtag.engines.api import ApiEngine, MissingAnswer, build_body, estimate_tokens, extract
from vlmtag.engines.base import EngineError, EngineSettings, Request, Usage
from vlmtag.images import EncodedImage

SECRET = "sk-test-0123456789abcdefSECRET"
SYSTEM = "You tag images."
USER = "Tag this image. Its description: a red square."


def png(colour: tuple[int, int, int], size: tuple[int, int] = (32, 24)) -> EncodedImage:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return EncodedImage(buf.getvalue(), "image/png", *size)


def distinct_images(n: int) -> list[EncodedImage]:
    return [png((i * 7 % 256, i * 13 % 256, i * 29 % 256)) for i in range(n)]


def request(image: EncodedImage | None = None) -> Request:
    return Request(image or png((200, 20, 20)), SYSTEM, USER)


@pytest.fixture
def server():
    with OpenAIServer() as s:
        yield s


@pytest.fixture
def make_engine(server, monkeypatch):
    """Build an engine for the test server; every engine built is closed after the test."""
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    engines: list[ApiEngine] = []

    def make(model_params: dict | None = None, **settings) -> ApiEngine:
        params = {"base_url": server.base_url, "api_key": SECRET}
        params.update(model_params or {})
        engine = ApiEngine(EngineSettings(model="qwen-vl-test", kind="api", model_params=params, **settings))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


# --- what is sent ----------------------------------------------------------------------------------


def test_body_is_a_plain_openai_chat_completion(server, make_engine):
    image = png((200, 20, 20))
    [response] = make_engine().generate([request(image)])

    assert response.ok, response.error
    [seen] = server.requests
    assert seen.method == "POST" and seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {SECRET}"
    assert seen.headers["content-type"] == "application/json"
    assert seen.body == {
        "model": "qwen-vl-test",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [
                {"type": "text", "text": USER},
                {"type": "image_url", "image_url": {"url": image.data_url()}},
            ]},
        ],
        "max_tokens": DEFAULT_MAX_TOKENS,
    }
    assert seen.image_sha == image_sha(image.data)


def test_sampling_params_are_sent_as_written_and_the_users_max_tokens_wins(server, make_engine):
    sampling = {"temperature": 0.1, "top_p": 0.9, "max_tokens": 64, "seed": 7, "stop": ["\n\n"]}
    make_engine(sampling_params=sampling).generate([request()])
    body = server.requests[0].body
    assert {k: body[k] for k in sampling} == sampling
    assert set(body) == {"model", "messages", *sampling}


def test_max_completion_tokens_replaces_the_default_max_tokens(server, make_engine):
    make_engine(sampling_params={"max_completion_tokens": 100}).generate([request()])
    body = server.requests[0].body
    assert body["max_completion_tokens"] == 100 and "max_tokens" not in body


def test_response_format_is_sent_only_when_a_json_schema_is_set(server, make_engine):
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
              "required": ["tags"]}
    make_engine().generate([request()])
    make_engine(json_schema=schema).generate([request()])
    without, with_schema = (r.body for r in server.requests)
    assert "response_format" not in without
    assert with_schema["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "image_tags", "schema": schema}}
    assert set(with_schema) == {"model", "messages", "max_tokens", "response_format"}


@pytest.mark.parametrize("system,user", [
    (SYSTEM, USER),
    ("", "naïve café, 日本語, \"quotes\" and \\ backslashes\n"),
    (SYSTEM, "vlmtag:image-data-url"),  # the prompt is the body builder's own placeholder, word for word
])
def test_the_wire_body_is_the_json_of_the_body_byte_for_byte(make_engine, system, user):
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}}}}
    for engine in (make_engine(), make_engine(json_schema=schema, sampling_params={"temperature": 0.2})):
        for image in (png((1, 2, 3)), EncodedImage(b"\xff\xd8 not really a jpeg", "image/jpeg", 8, 8)):
            req = Request(image, system, user)
            payload, _ = engine.encode(req)
            expected = json.dumps(build_body(req, engine._settings), ensure_ascii=False, separators=(",", ":"))
            assert payload == expected.encode("utf-8")
            assert json.loads(payload)["messages"][-1]["content"][1]["image_url"]["url"] == image.data_url()


def test_an_empty_system_prompt_sends_only_the_user_message():
    settings = EngineSettings(model="m", kind="api")
    body = build_body(Request(png((0, 0, 0)), "", "hi"), settings)
    assert [m["role"] for m in body["messages"]] == ["user"]


def test_client_headers_query_and_organization_from_model_params(server, make_engine):
    make_engine({"headers": {"X-Trace": "abc"}, "default_headers": {"X-Team": "data"},
                 "organization": "org-1", "default_query": {"api-version": "2024-06-01"}}).generate([request()])
    seen = server.requests[0]
    assert seen.headers["x-trace"] == "abc" and seen.headers["x-team"] == "data"
    assert seen.headers["openai-organization"] == "org-1"
    assert seen.query == "api-version=2024-06-01"


# --- where it is sent and where the answer is read -------------------------------------------------


def test_api_endpoint_as_a_path_under_the_base_url(server, make_engine):
    make_engine(api_endpoint="/generate").generate([request()])
    assert server.requests[0].path == "/v1/generate"


def test_api_endpoint_as_a_full_url_needs_no_base_url(server, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    url = f"http://127.0.0.1:{server.port}/custom/chat"
    with ApiEngine(EngineSettings(model="m", kind="api", api_endpoint=url)) as engine:
        [response] = engine.generate([request()])
    assert response.ok and server.requests[0].path == "/custom/chat"
    assert "authorization" not in server.requests[0].headers


def test_custom_response_path_reads_a_non_openai_answer(server, make_engine):
    server.behaviour = lambda body, attempt: Reply(body={"output": {"texts": ['{"tags": ["cat"]}']}})
    [response] = make_engine(response_path="output.texts.0").generate([request()])
    assert response.text == '{"tags": ["cat"]}'


def test_base_url_and_key_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with ApiEngine(EngineSettings(model="m", kind="api")) as engine:
        [response] = engine.generate([request()])
    assert response.ok
    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"


def test_no_base_url_is_a_clear_error_when_the_engine_is_built(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(EngineError, match="base_url.*OPENAI_BASE_URL"):
        ApiEngine(EngineSettings(model="m", kind="api", model_params={"api_key": SECRET}))


def test_building_the_engine_touches_no_network(server, make_engine):
    make_engine()
    ApiEngine(EngineSettings(model="m", kind="api", model_params={"base_url": "http://127.0.0.1:9/v1"})).close()
    assert server.count == 0


@pytest.mark.parametrize("bad", [{"timeout": "soon"}, {"timeout": 0}, {"base_url": "127.0.0.1:8000/v1"}])
def test_bad_client_settings_fail_when_built(bad):
    with pytest.raises(EngineError):
        ApiEngine(EngineSettings(model="m", kind="api", model_params={"base_url": "http://h/v1", **bad}))


@pytest.mark.parametrize("url", ["http://[::1/v1", "http://h:port/v1", "http:///v1"])
def test_a_malformed_base_url_fails_when_built_without_showing_its_credentials(url):
    url = url.replace("://", f"://user:{SECRET}@")
    with pytest.raises(EngineError, match="the API URL is not valid") as info:
        ApiEngine(EngineSettings(model="m", kind="api", model_params={"base_url": url}))
    assert SECRET not in str(info.value)


def test_start_gets_the_engine_ready_ahead_of_its_first_request(server, make_engine):
    def loop_threads() -> int:
        return sum(t.name == "vlmtag-api-engine" for t in threading.enumerate())

    engine = make_engine()
    before = loop_threads()
    engine.start()
    assert loop_threads() == before + 1  # its loop runs before any request
    engine.start()  # again: nothing more
    assert loop_threads() == before + 1
    assert server.count == 0  # connections are made ready, not opened
    [response] = engine.generate([request()])
    assert response.ok and server.count == 1


def test_extract_follows_a_dot_path_with_list_indices():
    answer = {"choices": [{"message": {"content": "first"}}, {"message": {"content": "second"}}]}
    assert extract(answer, "choices.0.message.content") == "first"
    assert extract(answer, "choices.1.message.content") == "second"
    assert extract({"a": {"b": ["x", {"c": "deep"}]}}, "a.b.1.c") == "deep"
    parts = {"choices": [{"message": {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}}]}
    assert extract(parts, "choices.0.message.content") == "ab"
    assert extract({"out": {"tags": ["x"]}}, "out") == '{"tags": ["x"]}'
    for missing in ({"choices": []}, {"choices": [{"message": {"content": None}}]}, {}, [], "text"):
        with pytest.raises(MissingAnswer, match="choices.0.message.content"):
            extract(missing, "choices.0.message.content")


# --- answers and failures ----------------------------------------------------------------------------


def test_answers_come_back_verbatim_one_per_request_in_order(server, make_engine):
    images = distinct_images(12)
    for i, image in enumerate(images):
        server.register(image.data, [f"tag-{i}"])
    shapes = [Reply.fenced(["cat"]), Reply.think(["dog"]), Reply.prose(["sky", "sea"])]
    odd = {image_sha(im.data): shapes[i % 3] for i, im in enumerate(images) if i % 2}
    server.behaviour = lambda body, attempt: odd.get(image_sha(_image_of(body)))
    responses = make_engine(concurrency=4).generate([request(im) for im in images])

    for i, response in enumerate(responses):
        if i % 2 == 0:
            assert response.text == tags_content([f"tag-{i}"])
        else:  # fenced, <think> and prose answers come back as the model wrote them
            assert response.text == shapes[i % 3].content
    assert all(r.ok and r.status == 200 for r in responses)


def _image_of(body) -> bytes:
    import base64
    url = body["messages"][-1]["content"][1]["image_url"]["url"]
    return base64.b64decode(url.split(",", 1)[1])


def test_the_default_answer_describes_the_image(server, make_engine):
    image = png((20, 40, 230), (40, 30))
    [response] = make_engine().generate([request(image)])
    assert response.text == tags_content(default_tags(image.data))
    assert default_tags(image.data)[:2] == ["blue", "40x30"]


IN_AN_HOUR = email.utils.formatdate(time.time() + 3600, usegmt=True)


@pytest.mark.parametrize(
    "reply, error, retryable, status",
    [
        (Reply.rate_limited(7), "HTTP 429: Rate limit reached", True, 429),
        (Reply.server_error(), "HTTP 500: Internal server error", True, 500),
        (Reply.unavailable(), "HTTP 503: The server is overloaded", True, 503),
        (Reply.error(502, "upstream failed"), "HTTP 502: upstream failed", True, 502),
        (Reply.error(408, "request timeout"), "HTTP 408: request timeout", True, 408),
        (Reply.error(409, "conflict"), "HTTP 409: conflict", True, 409),
        (Reply.unauthorized(), "HTTP 401: Incorrect API key provided", False, 401),
        (Reply.error(400, "image too large"), "HTTP 400: image too large", False, 400),
        (Reply(status=404, body="Not Found", headers={"Content-Type": "text/plain"}), "HTTP 404: Not Found", False, 404),
        (Reply(status=422, body={"object": "error", "message": "unknown field"}), "HTTP 422: unknown field", False, 422),
        (Reply.not_json(), "response is not JSON", True, 200),
        (Reply.no_choices(), "no choices.0.message.content in response", True, 200),
        (Reply.null_content(), "no choices.0.message.content in response", True, 200),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_each_failure_is_classified(server, make_engine, reply, error, retryable, status):
    server.script(reply)
    [response] = make_engine().generate([request()])
    assert not response.ok and response.text is None
    assert response.error.startswith(error), response.error
    assert (response.retryable, response.status) == (retryable, status)
    assert server.count == 1  # one attempt: the operator owns retries


@pytest.mark.parametrize(
    "headers, expected",
    [({"Retry-After": "7"}, 7.0), ({"Retry-After": "0.5"}, 0.5), ({"retry-after-ms": "1500"}, 1.5),
     ({"Retry-After": "not-a-date"}, None), ({}, None)],
)
def test_retry_after_in_seconds(server, make_engine, headers, expected):
    server.script(Reply.error(429, "slow down", headers=headers))
    [response] = make_engine().generate([request()])
    assert response.retry_after == expected


def test_retry_after_as_an_http_date(server, make_engine):
    server.script(Reply.unavailable(retry_after=IN_AN_HOUR))
    [response] = make_engine().generate([request()])
    assert response.retryable and 3000 < response.retry_after <= 3601


def test_long_server_messages_are_cut(server, make_engine):
    server.script(Reply.error(400, "x" * 5000))
    [response] = make_engine().generate([request()])
    assert len(response.error) < 230 and response.error.endswith("…")


def test_a_response_slower_than_the_timeout(server, make_engine):
    server.script(Reply.slow(5))
    engine = make_engine({"timeout": 0.3})
    [response] = engine.generate([request()])
    assert response.error == "timeout after 0.3s" and response.retryable and response.status is None
    [again] = engine.generate([request()])  # the engine is still usable
    assert again.ok


def test_a_dropped_connection_is_retryable_and_the_engine_recovers(server, make_engine):
    server.script(Reply.dropped())
    engine = make_engine(concurrency=1)
    [dropped] = engine.generate([request()])
    assert dropped.error.startswith("connection error:") and dropped.retryable
    [again] = engine.generate([request()])
    assert again.ok


def test_an_unreachable_server_is_a_retryable_connection_error(make_engine):
    with OpenAIServer() as gone:
        url = gone.base_url
    [response] = make_engine({"base_url": url}).generate([request()])
    assert response.error.startswith("connection error:") and response.retryable


def test_usage_is_read_when_present(server, make_engine):
    server.script(Reply.tags(["cat"], usage={"prompt_tokens": 321, "completion_tokens": 12}),
                  Reply(body={"choices": [{"message": {"content": "{}"}}]}))
    engine = make_engine(concurrency=1)
    [counted] = engine.generate([request()])
    [uncounted] = engine.generate([request()])
    assert counted.usage == Usage(prompt_tokens=321, completion_tokens=12)
    assert uncounted.ok and uncounted.usage == Usage()


# --- concurrency and threads -------------------------------------------------------------------------


def test_requests_in_flight_never_exceed_the_concurrency():
    with OpenAIServer(latency=0.2) as server:
        engine = ApiEngine(EngineSettings(model="m", kind="api", concurrency=4,
                                          model_params={"base_url": server.base_url}))
        with engine:
            responses = engine.generate([request(im) for im in distinct_images(16)])
    assert all(r.ok for r in responses)
    assert server.count == 16
    assert server.max_in_flight == 4
    assert server.connections_opened == 4  # kept alive: one connection per slot, reused


def test_two_threads_share_the_engine_and_its_concurrency_bound():
    images = distinct_images(24)
    with OpenAIServer(latency=0.05) as server:
        for i, image in enumerate(images):
            server.register(image.data, [f"tag-{i}"])
        engine = ApiEngine(EngineSettings(model="m", kind="api", concurrency=4,
                                          model_params={"base_url": server.base_url}))
        results: dict[int, list] = {}
        halves = {0: images[:12], 1: images[12:]}

        def work(k: int) -> None:
            results[k] = engine.generate([request(im) for im in halves[k]])

        with engine:
            threads = [threading.Thread(target=work, args=(k,)) for k in halves]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    texts = [r.text for k in (0, 1) for r in results[k]]
    assert texts == [tags_content([f"tag-{i}"]) for i in range(24)]
    assert server.max_in_flight <= 4
    assert all(server.count_for(im.data) == 1 for im in images)


def test_close_is_idempotent_and_generate_reopens(server, make_engine):
    engine = make_engine()
    assert engine.generate([]) == []
    engine.close()
    engine.close()
    [response] = engine.generate([request()])
    assert response.ok


def test_throttled_engine_still_answers(server, make_engine):
    engine = make_engine(max_requests_per_minute=6000, max_tokens_per_minute=1_000_000)
    assert all(r.ok for r in engine.generate([request(im) for im in distinct_images(3)]))


def test_token_estimate_counts_image_text_and_completion_budget():
    req = Request(png((0, 0, 0), (448, 448)), "s" * 40, "u" * 60)
    assert estimate_tokens(req, {}) == 256 + 25 + DEFAULT_MAX_TOKENS
    assert estimate_tokens(req, {"max_tokens": 100}) == 256 + 25 + 100


# --- the API key stays secret ------------------------------------------------------------------------


def test_the_api_key_never_shows_in_errors_repr_or_logs(server, make_engine, caplog):
    caplog.set_level(logging.DEBUG)
    server.script(Reply.unauthorized(f"Incorrect API key provided: {SECRET}"),
                  Reply(status=400, body=f"bad key {SECRET}", headers={"Content-Type": "text/plain"}),
                  Reply.slow(5), Reply.dropped(), Reply(body=f"not json {SECRET}"))
    engine = make_engine({"timeout": 0.3, "some_unknown_option": SECRET}, concurrency=1)
    responses = [engine.generate([request()])[0] for _ in range(5)]

    assert responses[0].error == "HTTP 401: Incorrect API key provided: ***"
    for response in responses:
        assert not response.ok and SECRET not in response.error
    assert SECRET not in repr(engine) and SECRET not in str(engine)
    assert SECRET not in caplog.text
    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"  # it was sent, though


def test_max_retries_is_accepted_quietly_and_unknown_params_warn_once(server, make_engine, caplog):
    caplog.set_level(logging.WARNING, logger="vlmtag.engines.api")
    make_engine({"max_retries": 5})
    assert caplog.records == []
    make_engine({"frobnicate_level": 3})
    make_engine({"frobnicate_level": 4})
    warnings = [r for r in caplog.records if "frobnicate_level" in r.getMessage()]
    assert len(warnings) == 1


def test_closing_the_engine_under_a_running_generate_ends_it(server, make_engine):
    server.behaviour = lambda body, attempt: Reply.slow(30)
    engine = make_engine({"timeout": 60})
    outcome: list = []

    def work() -> None:
        try:
            outcome.append(engine.generate([request()]))
        except EngineError as e:
            outcome.append(e)

    thread = threading.Thread(target=work)
    thread.start()
    for _ in range(1000):  # until the request reaches the server (at most ~10 s)
        if server.count:
            break
        time.sleep(0.01)
    engine.close()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert isinstance(outcome[0], EngineError) and "closed" in str(outcome[0])


def test_a_key_read_from_a_file_with_its_newline_still_works(server, make_engine):
    [response] = make_engine({"api_key": SECRET + "\n"}).generate([request()])
    assert response.ok
    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"
