"""A loopback server that speaks OpenAI chat completions, for tests and benchmarks.

Real HTTP/1.1 with keep-alive on 127.0.0.1, an asyncio protocol on its own event loop (a background
thread, or the main thread when run as a program). Answers are deterministic from the image; tests
script faults per request.

In a test::

    with OpenAIServer() as server:                 # server.base_url == "http://127.0.0.1:PORT/v1"
        server.register(image_bytes, ["cat", "sofa"])     # answer by the image's SHA-256
        server.script(Reply.rate_limited(2), Reply.dropped())   # the next two requests, in order
        server.behaviour = lambda body, attempt: Reply.server_error() if attempt == 1 else None
        ...
        server.count, server.count_for(image_bytes), server.requests[0].body, server.max_in_flight,
        server.connections_opened, server.reset()

A request's reply is the first of: the scripted queue, `behaviour(body, attempt_no)` (None: go on),
the answer registered for the image, the default rule (`default_tags`: size, mean colour and hash
of the image). `attempt_no` counts the requests for the same image, from 1.

As a program, for benchmarks (server CPU then does not share the client's GIL)::

    python tests/openai_server.py --port 0 --latency 0.5 --slots 32

prints `READY http://127.0.0.1:PORT/v1` once listening and serves until SIGINT/SIGTERM; from Python,
`with ServerProcess(latency=0.5, slots=32) as proc: proc.base_url` does that for you.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import http
import io
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["OpenAIServer", "Reply", "Recorded", "ServerProcess", "default_tags", "image_sha", "tags_content"]

# --------------------------------------------------------------------------------------------------
# What the server answers.


def image_sha(data: bytes) -> str:
    """The key under which answers are registered and requests counted: SHA-256 hex of the image bytes."""
    return hashlib.sha256(data).hexdigest()


def tags_content(tags: list[str]) -> str:
    """The model's answer text for these tags, as a well-behaved model writes it."""
    return json.dumps({"tags": list(tags)})


_PALETTE = {
    "black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128), "red": (220, 30, 30),
    "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (235, 220, 40), "orange": (240, 140, 20),
    "purple": (130, 40, 170), "pink": (240, 150, 190), "brown": (120, 70, 30), "cyan": (40, 200, 220),
}


def default_tags(data: bytes, *, decode: bool = True) -> list[str]:
    """The default answer for an image: its mean colour's name, its size, and `img-<first 8 hex of sha>`.

    With `decode=False` (or bytes Pillow can't read) only the hash tag: cheaper, for zero-latency benchmarks.
    """
    tags = [f"img-{image_sha(data)[:8]}"]
    if not decode:
        return tags
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            size = f"{im.width}x{im.height}"
            mean = im.convert("RGB").resize((1, 1), Image.BOX).getpixel((0, 0))
    except Exception:
        return ["unreadable-image"] + tags
    colour = min(_PALETTE, key=lambda n: sum((a - b) ** 2 for a, b in zip(_PALETTE[n], mean)))
    return [colour, size] + tags


@dataclass
class Reply:
    """One scripted answer. Build with the class methods; fields are public for odd cases.

    `content` is the assistant message text (200 only; None = the image's normal answer);
    `body` replaces the whole response body (dict/list → JSON, str/bytes → as is);
    `delay` seconds before answering (or until `until` is set, if that comes first); `drop` closes the
    connection without answering.
    """

    status: int = 200
    content: str | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    until: threading.Event | None = None
    drop: bool = False
    usage: dict[str, int] | None = None

    # -- good answers, in the shapes models write them
    @classmethod
    def tags(cls, tags: list[str], **kw: Any) -> "Reply":
        return cls(content=tags_content(tags), **kw)

    @classmethod
    def text(cls, content: str, **kw: Any) -> "Reply":
        return cls(content=content, **kw)

    @classmethod
    def fenced(cls, tags: list[str]) -> "Reply":
        return cls(content=f"```json\n{json.dumps({'tags': tags}, indent=2)}\n```")

    @classmethod
    def think(cls, tags: list[str]) -> "Reply":
        return cls(content=f"<think>\nThe image shows {', '.join(tags)}. I'll list them as tags.\n</think>\n"
                           + tags_content(tags))

    @classmethod
    def prose(cls, tags: list[str]) -> "Reply":
        return cls(content="Sure! Here are some tags for this image: " + ", ".join(tags) + ".")

    # -- faults
    @classmethod
    def error(cls, status: int, message: str, *, headers: dict[str, str] | None = None,
              type_: str = "invalid_request_error") -> "Reply":
        return cls(status=status, body={"error": {"message": message, "type": type_, "code": None}},
                   headers=dict(headers or {}))

    @classmethod
    def rate_limited(cls, retry_after: float | str | None = 1, message: str = "Rate limit reached") -> "Reply":
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        return cls.error(429, message, headers=headers, type_="rate_limit_error")

    @classmethod
    def server_error(cls, status: int = 500, message: str = "Internal server error",
                     retry_after: float | str | None = None) -> "Reply":
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        return cls.error(status, message, headers=headers, type_="server_error")

    @classmethod
    def unavailable(cls, retry_after: float | str | None = None) -> "Reply":
        return cls.server_error(503, "The server is overloaded", retry_after)

    @classmethod
    def unauthorized(cls, message: str = "Incorrect API key provided") -> "Reply":
        return cls.error(401, message, type_="invalid_api_key")

    @classmethod
    def slow(cls, seconds: float, then: "Reply | None" = None, *, until: threading.Event | None = None) -> "Reply":
        """`then` (the image's normal answer by default) after `seconds`, or once `until` is set if sooner."""
        reply = then or cls()
        reply.delay, reply.until = seconds, until
        return reply

    @classmethod
    def dropped(cls) -> "Reply":
        return cls(drop=True)

    @classmethod
    def not_json(cls, body: str = "<html><body><h1>502 Bad Gateway</h1></body></html>") -> "Reply":
        return cls(body=body, headers={"Content-Type": "text/html"})

    @classmethod
    def no_choices(cls) -> "Reply":
        return cls(body={"id": "chatcmpl-empty", "object": "chat.completion", "choices": []})

    @classmethod
    def null_content(cls) -> "Reply":
        return cls(body={"id": "chatcmpl-null", "object": "chat.completion",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": None},
                                      "finish_reason": "stop"}]})


def user_text(body: Any) -> str:
    """The text part of the user message in a chat-completions body ("" when there is none)."""
    for message in body.get("messages", []):
        if message.get("role") == "user" and isinstance(message.get("content"), list):
            for part in message["content"]:
                if part.get("type") == "text":
                    return part["text"]
    return ""


def say(body: Any, attempt: int) -> "Reply | None":
    """A `behaviour` answering the words after `say:` in the prompt as tags, so a test knows every row's tags."""
    text = user_text(body)
    return Reply.tags(text.split("say:", 1)[1].split("\n", 1)[0].split()) if "say:" in text else None


@dataclass
class Recorded:
    """One request as the server saw it."""

    method: str
    path: str
    query: str  # the raw query string, "" when none
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, or None when the body was not JSON
    image_sha: str | None  # of the first image_url's data, None when there is none
    attempt: int  # requests so far for the same image, this one included


def _first_image(body: Any) -> bytes | None:
    try:
        for message in body["messages"]:
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    url = part["image_url"]["url"]
                    if url.startswith("data:"):
                        return base64.b64decode(url[url.index(",") + 1:])
    except (KeyError, TypeError, ValueError, AttributeError, binascii.Error):
        return None
    return None


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


_REASONS = {s.value: s.phrase for s in http.HTTPStatus}


def _http_response(status: int, body: bytes, headers: dict[str, str], *, close: bool) -> bytes:
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
    names = {k.lower() for k in headers}
    if "content-type" not in names:
        head.append("Content-Type: application/json")
    head.extend(f"{k}: {v}" for k, v in headers.items())
    head.append(f"Content-Length: {len(body)}")
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


# --------------------------------------------------------------------------------------------------
# The server.


class _Connection(asyncio.Protocol):
    """HTTP/1.1 on one connection: requests answered one at a time, in order."""

    MAX_HEAD = 64 * 1024

    def __init__(self, server: "OpenAIServer") -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.pending: list[tuple[str, str, dict[str, str], bytes, bool]] = []
        self.busy = False
        self.task: asyncio.Task | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server._connections.add(self)
        with self.server._lock:
            self.server.connections_opened += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._connections.discard(self)
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > self.MAX_HEAD:
                    self._fail(431)
                return
            try:
                head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
                method, target, version = head[0].split(" ", 2)
                headers = {}
                for line in head[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
            except ValueError:
                self._fail(400)
                return
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._fail(411)
                return
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            conn = headers.get("connection", "").lower()
            close = conn == "close" or (version == "HTTP/1.0" and conn != "keep-alive")
            self.pending.append((method, target, headers, body, close))
            self._next()

    def _fail(self, status: int) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(_http_response(status, b"", {}, close=True))
            self.transport.close()
        self.closed = True

    def _next(self) -> None:
        while not self.busy and self.pending and not self.closed:
            method, target, headers, body, close = self.pending.pop(0)
            reply, data = self.server._answer(method, target, headers, body)
            if reply is None and self.server._fast:  # zero latency, no slots: answer right here
                self._send(data, close)
                self.server._leave()
                continue
            self.busy = True
            self.task = self.server._loop.create_task(self._later(reply, data, close))

    async def _later(self, reply: Reply | None, data: bytes, close: bool) -> None:
        server = self.server
        try:
            delay = (reply.delay if reply is not None else 0.0)
            if reply is not None and reply.until is not None:  # held until the test says so (or `delay`)
                await server._loop.run_in_executor(None, reply.until.wait, delay)
                delay = 0.0
            if server.slots is not None:
                async with server._slot_sem:
                    await asyncio.sleep(server.latency + delay)
            elif server.latency + delay > 0:
                await asyncio.sleep(server.latency + delay)
            if reply is not None and reply.drop:
                if self.transport is not None:
                    self.transport.close()
                self.closed = True
                return
            self._send(data, close)
        except asyncio.CancelledError:
            pass
        finally:
            server._leave()
            self.busy = False
            self.task = None
        self._next()

    def _send(self, data: bytes, close: bool) -> None:
        if self.transport is None or self.closed:
            return
        self.transport.write(data)
        if close:
            self.transport.close()
            self.closed = True


class OpenAIServer:
    """An OpenAI chat-completions server on 127.0.0.1 (see the module docstring).

    latency: seconds added to every request; slots: at most this many requests are served at once
    (the others wait); decode: whether the default answer decodes the image (False = hash only,
    faster); record: keep every request in `requests` (counts are kept either way).
    """

    def __init__(self, *, port: int = 0, latency: float = 0.0, slots: int | None = None,
                 model: str = "test-model", decode: bool = True, record: bool = True) -> None:
        self.port = port
        self.latency = float(latency)
        self.slots = slots
        self.model = model
        self.decode = decode
        self.record = record
        self.behaviour: Callable[[Any, int], Reply | None] | None = None
        self._answers: dict[str, list[str]] = {}
        self._queue: list[Reply] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self._slot_sem: asyncio.Semaphore | None = None
        self.reset()

    # -- the test-facing API -------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def register(self, image: bytes | str, tags: list[str]) -> None:
        """Answer `{"tags": tags}` for this image (bytes, or their SHA-256 hex)."""
        key = image if isinstance(image, str) else image_sha(image)
        with self._lock:
            self._answers[key] = list(tags)

    def script(self, *replies: Reply) -> None:
        """Queue replies for the next requests, one each, in arrival order, before `behaviour`."""
        with self._lock:
            self._queue.extend(replies)

    def reset(self) -> None:
        """Forget recorded requests, counts and the scripted queue (answers and behaviour stay)."""
        with self._lock:
            self.requests: list[Recorded] = []
            self.per_image: Counter[str] = Counter()
            self._count = 0
            self.in_flight = 0
            self.max_in_flight = 0
            self.connections_opened = 0
            self.errors: list[str] = []
            self._queue = []

    @property
    def count(self) -> int:
        """Requests received (complete bodies), all paths."""
        return self._count

    def count_for(self, image: bytes | str) -> int:
        key = image if isinstance(image, str) else image_sha(image)
        return self.per_image[key]

    @property
    def bodies(self) -> list[Any]:
        return [r.body for r in self.requests]

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "OpenAIServer":
        """Serve from a background daemon thread; returns once listening."""
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._listen(loop))
            except BaseException as e:  # reported to start()
                failure.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="openai-test-server", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        try:
            fut.result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            loop.close()
            self._loop = None

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._slot_sem = asyncio.Semaphore(self.slots) if self.slots else None
        self._server = await loop.create_server(lambda: _Connection(self), "127.0.0.1", self.port,
                                                backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.abort()
            if conn.task is not None:
                conn.task.cancel()
        await asyncio.sleep(0)

    # -- answering -----------------------------------------------------------------------------

    @property
    def _fast(self) -> bool:
        return self.latency == 0 and not self.slots

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _answer(self, method: str, target: str, headers: dict[str, str],
                raw: bytes) -> tuple[Reply | None, bytes]:
        """Record the request and decide the reply. Returns (reply or None for a plain answer, bytes)."""
        path, _, query = target.partition("?")
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        image = _first_image(body) if body is not None else None
        sha = image_sha(image) if image is not None else None
        with self._lock:
            self._count += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if sha is not None:
                self.per_image[sha] += 1
            attempt = self.per_image[sha] if sha is not None else self._count
            if self.record:
                self.requests.append(Recorded(method, path, query, headers, body, sha, attempt))
            reply = self._queue.pop(0) if self._queue else None
            registered = self._answers.get(sha) if sha is not None else None

        if method == "GET" and path.rstrip("/").endswith("/models"):
            return None, _http_response(200, _json_bytes(
                {"object": "list", "data": [{"id": self.model, "object": "model"}]}), {}, close=False)
        if method != "POST":
            return None, _http_response(405, _json_bytes({"error": {"message": "use POST"}}), {}, close=False)
        if body is None:
            return None, _http_response(400, _json_bytes({"error": {"message": "body is not JSON"}}), {},
                                        close=False)

        if reply is None and self.behaviour is not None:
            try:
                reply = self.behaviour(body, attempt)
            except Exception as e:  # a broken test behaviour shows as a 500 and in .errors
                with self._lock:
                    self.errors.append(f"behaviour failed: {type(e).__name__}: {e}")
                reply = Reply.server_error(500, f"test server behaviour failed: {e}")
        if reply is not None and reply.drop:
            return reply, b""
        if reply is not None and (reply.status != 200 or reply.body is not None):
            payload = reply.body
            if isinstance(payload, str):
                payload = payload.encode()
            elif not isinstance(payload, (bytes, bytearray)):
                payload = _json_bytes(payload) if payload is not None else b""
            return reply, _http_response(reply.status, bytes(payload), reply.headers, close=False)

        if reply is not None and reply.content is not None:
            content = reply.content
        else:
            tags = registered if registered is not None else (
                default_tags(image, decode=self.decode) if image is not None else ["no-image"])
            content = tags_content(tags)
        usage = reply.usage if reply is not None and reply.usage is not None else None
        if usage is None:
            prompt = len(raw) // 100 + 20
            completion = len(content) // 4 + 1
            usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                     "total_tokens": prompt + completion}
        data = _json_bytes({
            "id": f"chatcmpl-{self._count}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", self.model) if isinstance(body, dict) else self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": usage,
        })
        headers_out = reply.headers if reply is not None else {}
        response = _http_response(200, data, headers_out, close=False)
        return (reply if reply is not None and reply.delay else None), response


class ServerProcess:
    """This module run as a separate process (for benchmarks: the server's CPU then does not share the
    client's GIL). A context manager; `base_url` once started; `summary` (its closing line) once stopped."""

    def __init__(self, *, latency: float = 0.0, slots: int | None = None, decode: bool = True,
                 model: str = "test-model") -> None:
        self.args = [sys.executable, __file__, "--port", "0", "--latency", str(latency), "--model", model]
        if slots:
            self.args += ["--slots", str(slots)]
        if not decode:
            self.args.append("--no-decode")
        self.base_url = ""
        self.summary = ""
        self._proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile(mode="w+")

    def start(self) -> "ServerProcess":
        self._proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=self._log, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"the test server did not start: {line!r} {self.summary}")
        self.base_url = line.split()[1]
        return self

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        self._log.seek(0)
        self.summary = self._log.read().strip()
        self._log.close()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# As a program.


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    parser.add_argument("--slots", type=int, default=None, help="requests served at once; more wait")
    parser.add_argument("--no-decode", action="store_true", help="answer from the image hash only (faster)")
    parser.add_argument("--model", default="test-model")
    args = parser.parse_args(argv)

    try:  # a faster loop where it is installed; the stdlib one otherwise
        import uvloop  # type: ignore[import-not-found]

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = OpenAIServer(port=args.port, latency=args.latency, slots=args.slots, model=args.model,
                          decode=not args.no_decode, record=False)
    loop.run_until_complete(server._listen(loop))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, loop.stop)
    print(f"READY {server.base_url}", flush=True)
    try:
        loop.run_forever()
    finally:
        loop.run_until_complete(server._shutdown())
        loop.close()
        print(f"served {server.count} requests, at most {server.max_in_flight} at once", file=sys.stderr)


if __name__ == "__main__":
    main()
