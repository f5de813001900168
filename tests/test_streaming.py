"""Streaming within a batch (API engine): a request leaves as soon as its image is ready, a retry waits only for
its own backoff, and images that need no work are sent as their own bytes unless `reencode_images` is set."""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading
import time

import pytest
from PIL import Image

from openai_server import Reply, say
from taggers import make_op


def png_bytes(i: int, size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (i * 40 % 256, 90, 200 - i)).save(buf, "PNG")
    return buf.getvalue()


class SlowImages(http.server.BaseHTTPRequestHandler):
    """Serves /slow.png after `release` is set (or 20 s: a stalled test machine must not serve it early; the
    client's read timeout is 30 s)."""

    release: threading.Event
    served_at: list[float]

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.release.wait(20)
        self.served_at.append(time.monotonic())  # before the write: the client may ask with it at once
        body = png_bytes(99)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_images():
    handler = type("Handler", (SlowImages,), {"release": threading.Event(), "served_at": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}/slow.png"
    handler.release.set()
    httpd.shutdown()


def test_requests_leave_while_a_slow_image_of_the_same_batch_is_still_downloading(server, slow_images):
    handler, url = slow_images
    rows = [{"images": [url], "text": "say: slow"}]
    rows += [{"image_bytes": [png_bytes(i)], "images": [f"row{i}.png"], "text": f"say: fast-{i}"} for i in range(6)]
    asked: list[float] = []

    def behaviour(body, attempt):
        asked.append(time.monotonic())
        if len(asked) == 6:
            handler.release.set()  # the slow image is held back until six requests came (or 20 s)
        return say(body, attempt)

    server.behaviour = behaviour
    op = make_op(server, batch_size=16)
    try:
        out = op.process_rows(rows)
    finally:
        op.close()

    assert [r["__dj__meta__"]["image_tags"] for r in out] == [[["slow"]]] + [[[f"fast-{i}"]] for i in range(6)]
    assert len(asked) == 7
    assert max(asked[:6]) < handler.served_at[0] < asked[6]  # six requests left before the slow image was read


def test_a_retry_does_not_wait_for_the_slowest_request_of_its_batch(server):
    """Rounds would send the retry only once every first attempt is back, the slow one included. The slow answer
    is held until the retry comes (or 20 s, so a stalled machine does not fail the test)."""
    asked: dict[str, list[float]] = {}
    retried = threading.Event()

    def behaviour(body, attempt):
        text = str(body)
        word = "flaky" if "flaky" in text else "slow" if "slow" in text else "other"
        asked.setdefault(word, []).append(time.monotonic())
        if word == "flaky":
            if attempt == 1:
                return Reply.server_error(503)
            retried.set()
        if word == "slow":
            return Reply.slow(20.0, then=Reply.tags(["slow"]), until=retried)
        return say(body, attempt)

    server.behaviour = behaviour
    rows = [{"image_bytes": [png_bytes(0)], "images": ["s.png"], "text": "say: slow"},
            {"image_bytes": [png_bytes(1)], "images": ["f.png"], "text": "say: flaky"}]
    op = make_op(server, concurrency=4)  # its 60 s request timeout outlasts the slow answer's 20 s
    try:
        out = op.process_rows(rows)
    finally:
        op.close()
    assert [r["__dj__meta__"]["image_tags"] for r in out] == [[["slow"]], [["flaky"]]]
    assert (len(asked["slow"]), len(asked["flaky"])) == (1, 2)
    assert asked["flaky"][1] - asked["slow"][0] < 20.0  # the retry went while the slow request was out


@pytest.mark.parametrize(("reencode", "mime"), [(False, "image/png"), (True, "image/jpeg")])
def test_an_image_that_needs_no_work_is_sent_as_its_own_bytes_unless_reencode_images(server, reencode, mime):
    raw = png_bytes(3)
    op = make_op(server, reencode_images=reencode)
    try:
        [out] = op.process_rows([{"image_bytes": [raw], "images": ["x.png"], "text": "say: plot"}])
    finally:
        op.close()
    assert out["__dj__meta__"]["image_tags"] == [["plot"]]
    url = server.requests[0].body["messages"][-1]["content"][1]["image_url"]["url"]
    assert url.startswith(f"data:{mime};base64,")
    sent = base64.b64decode(url.split(",", 1)[1])
    assert (sent == raw) is (not reencode)
    assert Image.open(io.BytesIO(sent)).size == (48, 32)


def test_reencode_images_changes_the_cache_key_only_when_set(server):
    plain, default, forced = (make_op(server), make_op(server, reencode_images=False),
                              make_op(server, reencode_images=True))
    assert plain.fingerprint == default.fingerprint != forced.fingerprint


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling policies")
def test_batch_scheduling_is_scoped_and_leaves_a_chosen_policy_alone():
    from vlmtag.ops.loader import batch_scheduling

    def in_thread(fn):
        out = []
        t = threading.Thread(target=lambda: out.append(fn()))
        t.start()
        t.join()
        return out[0]

    def scoped():
        with batch_scheduling():
            inside = os.sched_getscheduler(0)
        return inside, os.sched_getscheduler(0)

    assert in_thread(scoped) == (os.SCHED_BATCH, os.SCHED_OTHER)

    def chosen():  # a thread its user put on SCHED_IDLE (lowering a priority needs no privilege) stays there
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return scoped()

    assert in_thread(chosen) == (os.SCHED_IDLE, os.SCHED_IDLE)
