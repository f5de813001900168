"""An OpenAI-compatible Batch API client: files (upload, list, content) and batches (create, retrieve, cancel,
list), over plain HTTP with the same base URL, key and headers as the online API engine.

Nothing here retries what could be paid twice: an upload or a create is sent again only when the first attempt
never reached the server (connection refused). Reads (retrieve, list, content) are retried a few times.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import httpx

from vlmtag.engines.api import (
    _Redactor, _resolve_url, _timeout_of, client_headers, client_query, parse_retry_after, server_message,
)
from vlmtag.engines.base import EngineSettings

log = logging.getLogger(__name__)

#: The endpoint every request line names (and the batch is created for).
CHAT_ENDPOINT = "/v1/chat/completions"
TRANSFER_TIMEOUT_S = 900.0  # uploads and downloads of files up to ~200 MB
READ_ATTEMPTS = 5
_QUOTA_WORDS = ("quota", "limit", "rate", "exceeded", "try again", "too many")


@dataclass
class BatchApiError(RuntimeError):
    """The provider refused a call, or could not be reached. `message` quotes the provider's words."""

    message: str
    status: int | None = None  # None: no HTTP answer at all
    retry_after: float | None = None
    code: str | None = None

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.message}" if self.status is not None else self.message

    @property
    def transient(self) -> bool:
        """Worth waiting and asking again: no answer, a server error, a rate limit or a quota."""
        return self.status is None or self.status >= 500 or self.status in (408, 409) or self.quota

    @property
    def quota(self) -> bool:
        """429, or an answer that names a quota or limit (providers differ: 400 `token_limit_exceeded`, ...)."""
        if self.status == 429:
            return True
        words = f"{self.code or ''} {self.message}".lower()
        return self.status in (400, 403) and any(w in words for w in _QUOTA_WORDS) and "invalid" not in words


class BatchClient:
    """Files and batches at `model_params.base_url` (else `OPENAI_BASE_URL`), with `model_params.api_key` (else
    `OPENAI_API_KEY`). The key is sent as a Bearer token and removed from every message kept."""

    def __init__(self, settings: EngineSettings) -> None:
        params = dict(settings.model_params or {})
        base_url = params.get("base_url") or os.environ.get("OPENAI_BASE_URL")
        api_key = str(params.get("api_key") or os.environ.get("OPENAI_API_KEY") or "").strip() or None
        self.base = _resolve_url(str(base_url) if base_url else None, "/").rstrip("/")
        self._redact = _Redactor(api_key)
        self._timeout = _timeout_of(params.get("timeout"))
        self._http = httpx.Client(headers=client_headers(params, api_key), params=client_query(params),
                                  timeout=self._timeout, follow_redirects=True)

    def __repr__(self) -> str:
        return f"BatchClient({self._redact(self.base)!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "BatchClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- files ---------------------------------------------------------------------------------------------

    def upload(self, path: str, filename: str) -> dict:
        """Upload a request file (`purpose=batch`); the provider's file object."""
        def send() -> httpx.Response:
            with open(path, "rb") as f:
                return self._http.post(self._url("/files"), data={"purpose": "batch"},
                                       files={"file": (filename, f, "application/jsonl")},
                                       timeout=max(self._timeout, TRANSFER_TIMEOUT_S))
        return self._json(self._send(send, reads=False))

    def list_files(self, purpose: str = "batch") -> list[dict]:
        """The newest files of `purpose` (one page: enough to find an upload whose answer was lost)."""
        reply = self._read("GET", "/files", params={"purpose": purpose, "limit": 10000, "order": "desc"})
        return list(self._json(reply).get("data") or [])

    def download(self, file_id: str, dest: str) -> int:
        """A file's content into `dest` (written beside it, then renamed: whole or not at all); its bytes."""
        part = f"{dest}.part"
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                with self._http.stream("GET", self._url(f"/files/{file_id}/content"),
                                       timeout=max(self._timeout, TRANSFER_TIMEOUT_S)) as reply:
                    if reply.status_code >= 300:
                        reply.read()
                        raise self._error(reply)
                    size = 0
                    with open(part, "wb") as f:
                        for chunk in reply.iter_bytes(1 << 20):
                            f.write(chunk)
                            size += len(chunk)
                        f.flush()
                        os.fsync(f.fileno())
                expected = reply.headers.get("content-length")
                if expected is not None and int(expected) != size:
                    raise BatchApiError(f"download of {file_id} ended after {size} of {expected} bytes")
                os.replace(part, dest)
                return size
            except httpx.HTTPError as e:
                error = BatchApiError(f"download of {file_id}: {self._describe(e)}")
            except BatchApiError as e:
                error = e
            if not error.transient or attempt == READ_ATTEMPTS:
                raise error
            self._pause(attempt, error)
        raise AssertionError("unreachable")

    # -- batches -------------------------------------------------------------------------------------------

    def create(self, input_file_id: str, metadata: Mapping[str, str]) -> dict:
        """Create the batch of an uploaded file. A refusal (429, a quota) is raised for the caller to wait on."""
        body = {"input_file_id": input_file_id, "endpoint": CHAT_ENDPOINT, "completion_window": "24h",
                "metadata": dict(metadata)}
        return self._json(self._send(lambda: self._http.post(self._url("/batches"), json=body), reads=False))

    def retrieve(self, batch_id: str) -> dict:
        return self._json(self._read("GET", f"/batches/{batch_id}"))

    def cancel(self, batch_id: str) -> dict:
        return self._json(self._read("POST", f"/batches/{batch_id}/cancel"))

    def list_batches(self, *, page_size: int = 100, max_pages: int = 20) -> Iterator[dict]:
        """The provider's batches, newest first."""
        after = None
        for _ in range(max_pages):
            params: dict[str, Any] = {"limit": page_size}
            if after:
                params["after"] = after
            page = self._json(self._read("GET", "/batches", params=params))
            data = list(page.get("data") or [])
            yield from data
            if not page.get("has_more") or not data:
                return
            after = page.get("last_id") or data[-1].get("id")

    # -- plumbing ------------------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return self.base + path

    def _read(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._send(lambda: self._http.request(method, self._url(path), **kwargs), reads=True)

    def _send(self, call, *, reads: bool) -> httpx.Response:
        """`call()` until it answers 2xx. Reads are retried on transient failures; writes (upload, create) only
        when the request never reached the server, so nothing is paid twice."""
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                reply = call()
            except httpx.ConnectError as e:
                error = BatchApiError(f"cannot connect to {self._redact(self.base)}: {self._describe(e)}")
            except httpx.HTTPError as e:
                error = BatchApiError(f"connection error: {self._describe(e)}")
                if not reads:
                    raise error from None
            else:
                if reply.status_code < 300:
                    return reply
                error = self._error(reply)
                if not reads:
                    raise error
            if not error.transient or attempt == READ_ATTEMPTS:
                raise error
            self._pause(attempt, error)
        raise AssertionError("unreachable")

    def _pause(self, attempt: int, error: BatchApiError) -> None:
        wait = min(error.retry_after if error.retry_after is not None else 2.0 ** (attempt - 1), 30.0)
        log.warning("Batch API: %s; asking again in %.0f s", error, wait)
        time.sleep(wait)

    def _error(self, reply: httpx.Response) -> BatchApiError:
        code = None
        try:
            data = json.loads(reply.content)
            error = data.get("error") if isinstance(data, dict) else None
            if isinstance(error, dict) and error.get("code"):
                code = str(error["code"])
        except ValueError:
            pass
        message = self._redact(server_message(reply.content)) or reply.reason_phrase
        return BatchApiError(message, status=reply.status_code, retry_after=parse_retry_after(reply.headers),
                             code=code)

    def _json(self, reply: httpx.Response) -> dict:
        try:
            data = reply.json()
        except ValueError:
            raise BatchApiError(f"the Batch API answered {reply.request.url.path} with something that is not JSON",
                                status=reply.status_code) from None
        if not isinstance(data, dict):
            raise BatchApiError(f"the Batch API answered {reply.request.url.path} with JSON that is not an object",
                                status=reply.status_code)
        return data

    def _describe(self, e: BaseException) -> str:
        return self._redact(str(e) or type(e).__name__)
