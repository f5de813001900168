"""OpenAI-compatible chat completions (vllm serve, SGLang, Ollama, DashScope, OpenAI, ...).

One attempt per request: the operator owns the attempt budget and sends the retryable ones again (through
`run_batch`), so nothing here retries (aiohttp does not retry a request on its own).

Requests run concurrently on one private event loop in a background daemon thread, over
`settings.concurrency` keep-alive connections; that bounds the requests in flight across all
`generate` / `run_batch` calls together, whichever threads they come from.

The client is aiohttp: one `ClientSession` whose connector keeps the connections alive. Its HTTP parser is C
(llhttp), and at high request rates the client's CPU per request is what limits a tagging run, since it shares
one interpreter with reading, hashing and keeping the answers: against a zero-latency loopback server a bare
aiohttp client posts ~10,000 requests/s on this project's 2-core machines where the leanest httpx (one
single-connection transport per slot) posts ~2,300, and a whole small-image run goes about twice as fast
(BENCHMARKS.md, P1b). aiohttp is imported on the engine's own thread when it starts (`start`, ahead of the first
request), not when the engine is built: a run's first images are read and prepared meanwhile.

Where a request is built: `build_body`. Where an answer is read: `extract`. Both are pure.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import email.utils
import json
import logging
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from aiolimiter import AsyncLimiter

from vlmtag.cost import text_tokens, visual_tokens
from vlmtag.defaults import DEFAULT_MAX_TOKENS
from vlmtag.engines.base import (
    CLIENT_PARAMS, Engine, EngineError, EngineSettings, OnResponse, Request, Response, Usage, chat_messages,
)
from vlmtag.engines.sampling import answer_budget

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "/chat/completions"
DEFAULT_RESPONSE_PATH = "choices.0.message.content"
DEFAULT_TIMEOUT_S = 120.0
#: Statuses worth another attempt: request timeout, conflict, rate limit, and every server error.
RETRYABLE_STATUSES = frozenset({408, 409, 429})

_warned_params: set[str] = set()
_warned_lock = threading.Lock()

_ERROR_TEXT_LIMIT = 200
# Python 3.11+: a deadline on the running task; `wait_for` (3.10) wraps each request in a task of its own.
_deadline = getattr(asyncio, "timeout", None)


# --------------------------------------------------------------------------------------------------
# Pure functions: the request body, the answer, the error text.


def build_body(request: Request, settings: EngineSettings, image_url: str | None = None) -> dict[str, Any]:
    """The JSON body of one chat completion for one image.

    `{"model", "messages": [system, user], **sampling_params}`, with `max_tokens` = `DEFAULT_MAX_TOKENS` (the
    answer budget) when the sampling params cap neither `max_tokens` nor `max_completion_tokens`, and a standard
    `response_format` json_schema when `settings.json_schema` is a dict (unless the sampling params
    already carry a `response_format`, which wins). The system message is left out when the system
    prompt is empty. `image_url` stands in for the image's data URL when given.
    """
    messages = chat_messages(request, image_url)
    body: dict[str, Any] = {"model": settings.model, "messages": messages, **settings.sampling_params}
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = DEFAULT_MAX_TOKENS
    if isinstance(settings.json_schema, dict) and "response_format" not in body:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "image_tags", "schema": settings.json_schema},
        }
    return body


class MissingAnswer(ValueError):
    """The response JSON has nothing (or null) at the response path."""


def _path_segments(response_path: str) -> list[str]:
    segments = [s for s in response_path.strip().split(".") if s != ""]
    if not segments:
        raise ValueError(f"empty response_path {response_path!r}")
    return segments


def extract(body_json: Any, response_path: str) -> str:
    """The answer text at a dot path into the response JSON; integer segments index lists.

    A string is returned as is; a list of content parts (`[{"type": "text", "text": ...}]`) is
    joined; any other JSON value is returned as JSON text. Raises `MissingAnswer` when a segment is
    missing or the value is null.
    """
    node = body_json
    for segment in _path_segments(response_path):
        if isinstance(node, list):
            try:
                node = node[int(segment)]
            except (ValueError, IndexError):
                raise MissingAnswer(f"no {response_path} in response") from None
        elif isinstance(node, dict) and segment in node:
            node = node[segment]
        else:
            raise MissingAnswer(f"no {response_path} in response")
    if node is None:
        raise MissingAnswer(f"no {response_path} in response (it is null)")
    if isinstance(node, str):
        return node
    if isinstance(node, list) and node and all(isinstance(p, dict) and "text" in p for p in node):
        return "".join(str(p["text"]) for p in node)
    return json.dumps(node, ensure_ascii=False)


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` as seconds or as an HTTP-date."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


_TAG_RE = re.compile(r"<[^>]*>")
_SPACE_RE = re.compile(r"\s+")


def _shorten(text: str, limit: int = _ERROR_TEXT_LIMIT) -> str:
    text = _SPACE_RE.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def server_message(content: bytes) -> str:
    """The server's own words from an error body: `error.message` (or similar) from JSON, else text."""
    text = content.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return _shorten(_TAG_RE.sub(" ", text))
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return _shorten(str(error["message"]))
        for candidate in (error, data.get("message"), data.get("detail")):
            if isinstance(candidate, str) and candidate:
                return _shorten(candidate)
    return _shorten(text)


# --------------------------------------------------------------------------------------------------
# Settings → a resolved client configuration.


def _resolve_url(base_url: str | None, api_endpoint: str | None) -> str:
    endpoint = (api_endpoint or DEFAULT_ENDPOINT).strip()
    if endpoint.startswith(("http://", "https://")):
        return endpoint
    if not base_url:
        raise EngineError(
            "no API base URL: set model_params.base_url (e.g. http://127.0.0.1:8000/v1) or the "
            "OPENAI_BASE_URL environment variable, or give api_endpoint as a full http(s) URL"
        )
    base_url = base_url.strip()
    if not base_url.startswith(("http://", "https://")):
        raise EngineError(f"API base URL must start with http:// or https:// (got {base_url!r})")
    return base_url.rstrip("/") + "/" + endpoint.lstrip("/")


def _timeout_of(value: Any) -> float:
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise EngineError(f"model_params.timeout must be a number of seconds (got {value!r})") from None
    if not seconds > 0:
        raise EngineError(f"model_params.timeout must be > 0 seconds (got {value!r})")
    return seconds


def _warn_unknown(keys: Sequence[str]) -> None:
    with _warned_lock:
        fresh = sorted(k for k in keys if k not in _warned_params)
        _warned_params.update(fresh)
    if fresh:
        log.warning("API engine ignores model_params it does not know: %s", ", ".join(fresh))


def _str_headers(value: Any, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise EngineError(f"model_params.{name} must be a mapping of header names to values")
    return {str(k): str(v) for k, v in value.items()}


class _Redactor:
    """Removes the API key from any text we keep (servers sometimes echo it back)."""

    # A key shorter than this is a placeholder ("x", "EMPTY"'s cousins), not a secret; blanking
    # every occurrence of it would garble messages.
    MIN_SECRET_LEN = 4

    def __init__(self, secret: str | None) -> None:
        self._secret = secret if secret and len(secret) >= self.MIN_SECRET_LEN else None

    def __call__(self, text: str) -> str:
        if self._secret and self._secret in text:
            text = text.replace(self._secret, "***")
        return text

    def __repr__(self) -> str:
        return "_Redactor(***)"


def _make_limiter(per_minute: float | None, name: str) -> AsyncLimiter | None:
    """A leaky bucket releasing `per_minute` units a minute, smoothly (per second where it can); None
    when there is no limit.

    Rate limits such as DashScope's are enforced per second too, so a minute's budget is not burst
    at once: the bucket holds one second's share (or one unit, for slow rates).
    """
    if per_minute is None:
        return None
    if not per_minute > 0:
        raise EngineError(f"{name} must be > 0 (got {per_minute!r})")
    if per_minute >= 60:
        return AsyncLimiter(per_minute / 60.0, 1.0)
    return AsyncLimiter(1, 60.0 / per_minute)


def estimate_tokens(request: Request, sampling_params: Mapping[str, Any]) -> int:
    """Prompt + completion tokens of a request: Qwen-style image tokens, text/4, and the answer budget."""
    text = text_tokens(request.system_prompt) + text_tokens(request.user_text)
    return visual_tokens(request.image.width, request.image.height) + text + answer_budget(sampling_params)


# --------------------------------------------------------------------------------------------------
# The engine.

_IMAGE_SLOT = "vlmtag:image-data-url"  # a placeholder for the data URL while a body is serialised (`encode`)
_IMAGE_SLOT_BYTES = f'"{_IMAGE_SLOT}"'.encode("ascii")


def client_headers(params: Mapping[str, Any], api_key: str | None) -> dict[str, str]:
    """The HTTP headers `model_params` ask for (`headers`, `default_headers`, `organization`, `project`) and the
    key's `Authorization`, as every OpenAI-compatible call of vlmtag sends them."""
    headers = {"User-Agent": "vlmtag"}
    headers.update(_str_headers(params.get("default_headers"), "default_headers"))
    headers.update(_str_headers(params.get("headers"), "headers"))
    if params.get("organization"):
        headers["OpenAI-Organization"] = str(params["organization"])
    if params.get("project"):
        headers["OpenAI-Project"] = str(params["project"])
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def client_query(params: Mapping[str, Any]) -> dict[str, Any]:
    """`model_params.default_query`: query parameters every call carries (Azure's `api-version`, say)."""
    query = params.get("default_query")
    if query is not None and not isinstance(query, Mapping):
        raise EngineError("model_params.default_query must be a mapping")
    return dict(query or {})


@dataclass(frozen=True)
class _Reply:
    """An HTTP answer, read in full."""

    status: int
    content: bytes
    headers: Mapping[str, str]  # case-insensitive (aiohttp's)
    reason: str


class ApiEngine(Engine):
    """Chat completions over HTTP, one attempt per request, `settings.concurrency` in flight.

    model_params: `base_url`, `api_key` (else env OPENAI_BASE_URL / OPENAI_API_KEY), `timeout`
    (seconds per request, default 120), `headers` / `default_headers`, `default_query`,
    `organization`, `project`; `max_retries` is accepted and ignored (the operator retries).
    Other keys are ignored with a one-time warning. Building touches no network.
    """

    kind = "api"
    streams = True

    def __init__(self, settings: EngineSettings) -> None:
        params = dict(settings.model_params or {})
        unknown = [k for k in params if k not in CLIENT_PARAMS]
        if unknown:
            _warn_unknown(unknown)

        base_url = params.get("base_url") or os.environ.get("OPENAI_BASE_URL")
        # A key read from a file often ends in a newline, which no header may carry.
        api_key = str(params.get("api_key") or os.environ.get("OPENAI_API_KEY") or "").strip() or None
        self._url = _resolve_url(str(base_url) if base_url else None, settings.api_endpoint)
        self._response_path = settings.response_path or DEFAULT_RESPONSE_PATH
        try:
            _path_segments(self._response_path)
        except ValueError as e:
            raise EngineError(str(e)) from None
        self._timeout = _timeout_of(params.get("timeout"))
        if settings.concurrency < 1:
            raise EngineError(f"concurrency must be >= 1 (got {settings.concurrency})")
        self._concurrency = int(settings.concurrency)
        self._settings = settings
        self._redact = _Redactor(api_key)

        headers = {"Content-Type": "application/json", "Accept": "application/json", **client_headers(params, api_key)}
        self._headers = headers
        self._query = client_query(params)
        self._origin = _origin(self._url)  # host[:port], never credentials
        self._request_url: Any = None  # a yarl URL, made with the session on the engine's thread
        # Checked now so a bad rate fails at build time; the limiters themselves are made on the
        # engine's loop.
        _make_limiter(settings.max_requests_per_minute, "max_requests_per_minute")
        _make_limiter(settings.max_tokens_per_minute, "max_tokens_per_minute")

        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None  # `concurrency` requests at a time
        self._rpm: AsyncLimiter | None = None
        self._tpm: AsyncLimiter | None = None
        self._tasks: set[asyncio.Task] = set()  # requests started by `send`
        self._loop_thread_id: int | None = None

    def __repr__(self) -> str:
        return (
            f"ApiEngine(model={self._settings.model!r}, url={self._redact(self._url)!r}, "
            f"concurrency={self._concurrency}, timeout={self._timeout:g})"
        )

    # -- the loop thread -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine's thread and loop, and make its connections (they connect on first use)."""
        self._ensure_loop()

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is not None:
                return self._loop
            loop = _new_event_loop()
            ready = threading.Event()

            def run() -> None:
                self._loop_thread_id = threading.get_ident()
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            thread = threading.Thread(target=run, name="vlmtag-api-engine", daemon=True)
            thread.start()
            ready.wait()
            try:
                asyncio.run_coroutine_threadsafe(self._open(), loop).result()
            except Exception as e:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=10)
                raise EngineError(f"cannot start the API client: {self._redact(str(e))}") from None
            self._loop, self._thread = loop, thread
            return loop

    async def _open(self) -> None:
        import aiohttp
        from yarl import URL

        url = URL(self._url)
        self._request_url = url.update_query(self._query) if self._query else url
        tls: Any = True  # plain http never shakes hands: no CA bundle to load
        if url.scheme == "https":
            import httpx  # its TLS set-up, as before: certifi's CAs, or SSL_CERT_FILE / SSL_CERT_DIR

            tls = httpx.create_ssl_context()
        connector = aiohttp.TCPConnector(limit=self._concurrency, limit_per_host=0, ssl=tls)
        # No session-wide timeout: each request has its own (`_one`); no proxies from the environment, as before.
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        self._slots = asyncio.Semaphore(self._concurrency)
        self._rpm = _make_limiter(self._settings.max_requests_per_minute, "max_requests_per_minute")
        self._tpm = _make_limiter(self._settings.max_tokens_per_minute, "max_tokens_per_minute")

    def close(self) -> None:
        """Close the connections and stop the loop thread. Idempotent; `generate` afterwards starts afresh.

        Requests still in flight are cancelled: a `generate` waiting on them raises `EngineError`.
        """
        with self._lock:
            loop, thread, session = self._loop, self._thread, self._session
            self._loop, self._thread, self._session = None, None, None
            if loop is None:
                return
            try:
                asyncio.run_coroutine_threadsafe(_shutdown(session), loop).result(timeout=10)
            except Exception as e:  # closing must not raise over a failed run
                log.debug("closing the API client failed: %s", self._redact(repr(e)))
            finally:
                loop.call_soon_threadsafe(loop.stop)
                if thread is not None:
                    thread.join(timeout=10)
                if not loop.is_running():
                    loop.close()

    # -- requests --------------------------------------------------------------------------------

    def encode(self, request: Request) -> tuple[bytes, int]:
        """The request's JSON body, and its token estimate when a tokens-per-minute limit needs one.

        The body is serialised with a stand-in for the image's data URL, and the base64 bytes go in its place:
        base64 needs no JSON escaping, and a photo's 150 KB are then copied once instead of four times (to a
        str, into the URL, through the JSON encoder, back to UTF-8), ~0.6 ms of a loader thread's GIL time."""
        try:
            body = build_body(request, self._settings, image_url=_IMAGE_SLOT)
            text = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise ValueError(f"cannot build the request body: {self._redact(str(e))}") from None
        parts = text.split(_IMAGE_SLOT_BYTES)
        if len(parts) == 2:
            image = request.image
            payload = b"".join((parts[0], b'"data:', image.mime.encode("ascii"), b";base64,",
                                base64.b64encode(image.data), b'"', parts[1]))
        else:  # the prompt itself holds the stand-in: serialise the whole body
            payload = json.dumps(build_body(request, self._settings), ensure_ascii=False,
                                 separators=(",", ":")).encode("utf-8")
        return payload, estimate_tokens(request, body) if self._settings.max_tokens_per_minute else 0

    def send(self, items: Sequence[tuple[tuple[bytes, int], OnResponse]]) -> None:
        """Start each request on the engine's loop (one wake-up for all of them); `on_response` runs on that
        loop's thread as each answer arrives. A request still out when the engine closes gets an error response."""
        if not items:
            return
        loop = self._ensure_loop()
        if threading.get_ident() == self._loop_thread_id:  # from an answer's callback: no need to wake the loop
            self._start(list(items))
        else:
            loop.call_soon_threadsafe(self._start, list(items))

    def _start(self, items: list[tuple[tuple[bytes, int], OnResponse]]) -> None:
        for (payload, tokens), on_response in items:
            task = asyncio.get_running_loop().create_task(self._sent(payload, tokens, on_response))
            self._tasks.add(task)  # the loop keeps only weak references to its tasks
            task.add_done_callback(self._tasks.discard)

    async def _sent(self, payload: bytes, tokens: int, on_response: OnResponse) -> None:
        try:
            response = await self._one(payload, tokens)
        except asyncio.CancelledError:
            on_response(Response(error="the API engine was closed before the answer came"))
            raise
        on_response(response)

    def generate(self, requests: Sequence[Request]) -> list[Response]:
        return self.run_batch(requests, None)

    def run_batch(
        self, requests: Sequence[Request], on_response: Callable[[int, Response], None] | None
    ) -> list[Response]:
        """Like `generate`; `on_response(index, response)` is called as each answer arrives (on the engine's
        event-loop thread), so the caller can keep finished work even if the process dies mid-batch."""
        if not requests:
            return []
        jobs: list[tuple[bytes, int] | Response] = []
        for request in requests:
            try:
                jobs.append(self.encode(request))
            except ValueError as e:
                jobs.append(Response(error=str(e)))
        loop = self._ensure_loop()
        try:
            future = asyncio.run_coroutine_threadsafe(self._run(jobs, on_response), loop)
        except RuntimeError:  # closed between the two lines above
            raise EngineError("the API engine was closed during generate") from None
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise EngineError("the API engine was closed during generate") from None
        except BaseException:  # e.g. KeyboardInterrupt in the caller: stop this batch's requests
            future.cancel()
            raise

    async def _run(
        self, jobs: list[tuple[bytes, int] | Response], on_response: Callable[[int, Response], None] | None
    ) -> list[Response]:
        async def one(i: int, job: tuple[bytes, int] | Response) -> Response:
            response = job if isinstance(job, Response) else await self._one(*job)
            if on_response is not None:
                on_response(i, response)
            return response

        return list(await asyncio.gather(*(one(i, job) for i, job in enumerate(jobs))))

    async def _one(self, payload: bytes, tokens: int) -> Response:
        import aiohttp

        assert self._slots is not None
        async with self._slots:
            if self._rpm is not None:
                await self._rpm.acquire()
            if self._tpm is not None:
                await self._tpm.acquire(min(tokens, self._tpm.max_rate))
            try:
                if _deadline is not None:
                    async with _deadline(self._timeout):
                        reply = await self._post(payload)
                else:
                    reply = await asyncio.wait_for(self._post(payload), timeout=self._timeout)
            except asyncio.TimeoutError:
                return Response(error=f"timeout after {self._timeout:g}s", retryable=True)
            except aiohttp.ServerDisconnectedError:  # the connection closed before an answer (or mid-answer)
                return Response(error="connection error: server closed the connection without a response",
                                retryable=True)
            except aiohttp.ClientConnectorError as e:  # refused, or the name does not resolve: nobody answered
                return Response(error=f"connection error: cannot connect to {self._origin}: {self._describe(e)}",
                                retryable=True, unreachable=True)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:  # reset, cut short
                return Response(error=f"connection error: {self._describe(e)}", retryable=True)
            except aiohttp.ClientError as e:  # bad URL, a response that is not HTTP...
                return Response(error=f"request error: {self._describe(e)}")
            except Exception as e:  # a failure of one request must not fail the batch
                return Response(error=f"unexpected error: {self._describe(e)}")
        return self._classify(reply)

    async def _post(self, payload: bytes) -> _Reply:
        assert self._session is not None
        async with self._session.post(self._request_url, data=payload, headers=self._headers) as reply:
            return _Reply(reply.status, await reply.read(), reply.headers, reply.reason or "")

    def _describe(self, e: BaseException) -> str:
        return self._redact(_shorten(str(e) or type(e).__name__))

    def _classify(self, reply: _Reply) -> Response:
        status = reply.status
        if not 200 <= status < 300:
            retryable = status in RETRYABLE_STATUSES or status >= 500
            message = self._redact(server_message(reply.content)) or reply.reason
            return Response(
                error=f"HTTP {status}: {message}" if message else f"HTTP {status}",
                retryable=retryable,
                retry_after=parse_retry_after(reply.headers),
                status=status,
            )
        try:
            data = json.loads(reply.content)
        except ValueError:
            snippet = self._redact(_shorten(reply.content.decode("utf-8", errors="replace"), 60))
            return Response(
                error="response is not JSON" + (f": {snippet}" if snippet else " (empty body)"),
                retryable=True,
                status=status,
            )
        try:
            text = extract(data, self._response_path)
        except MissingAnswer as e:
            error = str(e)
            if isinstance(data, dict) and data.get("error"):
                error += f" (error: {self._redact(server_message(json.dumps(data).encode()))})"
            return Response(error=error, retryable=True, status=status, usage=_usage_of(data))
        return Response(text=text, status=status, usage=_usage_of(data))


def _origin(url: str) -> str:
    """host[:port] of `url`, without credentials (what connection errors name); EngineError when it is no URL."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as e:  # the message names the fault, not the URL, which may hold a key
        raise EngineError(f"the API URL is not valid: {e}") from None
    if not parts.hostname:
        raise EngineError("the API URL is not valid: it names no host")
    return parts.netloc.rpartition("@")[2]


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (a dependency on Linux and macOS): at high request rates the loop's own
    bookkeeping is a large share of the process's CPU, and uvloop does it in C."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _shutdown(session: aiohttp.ClientSession | None) -> None:
    """Cancel whatever is still running on the engine's loop, then close every connection."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
    if session is not None:
        await session.close()


def _usage_of(data: Any) -> Usage:
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return Usage()

    def count(key: str) -> int:
        value = usage.get(key)
        return int(value) if isinstance(value, (int, float)) and value >= 0 else 0

    return Usage(prompt_tokens=count("prompt_tokens"), completion_tokens=count("completion_tokens"))
