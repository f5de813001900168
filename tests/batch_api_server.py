"""A loopback server that speaks the OpenAI Batch API (files and batches), for tests.

    with BatchAPIServer() as server:                # server.base_url == "http://127.0.0.1:PORT/v1"
        server.fates = ["expired", "failed"]         # what the next created batches do (then: completed)
        server.refuse_creates = 2                    # the next two creates get a 429
        server.answer = lambda body, custom_id, attempt: Line.tags(["cat"])   # per request line
        server.hold_next("create")                   # the next create is received and never answered
        ...
        server.uploads, server.creates, server.downloads, server.held, server.violations

Files: `POST /files` (multipart, purpose=batch), `GET /files` (list), `GET /files/{id}`, `GET /files/{id}/content`.
Online: `POST /chat/completions` answers as a line would (counted in `online`).
Batches: `POST /batches`, `GET /batches` (list, newest first, `limit`/`after`), `GET /batches/{id}`,
`POST /batches/{id}/cancel`. A batch moves one status per `steps[status]` retrieves: validating → in_progress →
finalizing → completed; its fate can instead be `expired` (half the requests run; the rest in the error file as
`batch_expired`), `failed` (at validation, with `errors`), or `cancelled` (by someone else, half run). Output
lines come out of order. A request line's answer is `answer(body, custom_id, attempt)` (default: the words after
`say:` in the prompt as tags, as `openai_server.say`); `attempt` counts the lines run for that custom_id.

`violations` lists every request put into a batch while it was in another live batch or already answered: what
the client must never pay for twice.
"""

from __future__ import annotations

import email.parser
import json
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

from openai_server import _first_image, default_tags, tags_content, user_text

__all__ = ["BatchAPIServer", "Line"]

LIVE = ("validating", "in_progress", "finalizing", "cancelling")


@dataclass
class Line:
    """What one request line gets: an answer (200) or an error (in the error file)."""

    status: int = 200
    content: str | None = None
    message: str = ""
    usage: dict | None = None
    good: bool = True  # a usable answer: its custom_id must never be submitted again

    @classmethod
    def tags(cls, tags: list[str], **kw: Any) -> "Line":
        return cls(content=tags_content(tags), **kw)

    @classmethod
    def text(cls, content: str, **kw: Any) -> "Line":
        """An answer the client cannot parse (it may ask again)."""
        return cls(content=content, good=False, **kw)

    @classmethod
    def error(cls, status: int, message: str) -> "Line":
        return cls(status=status, message=message)


def say_line(body: Any, custom_id: str, attempt: int) -> Line:
    text = user_text(body)
    if "say:" in text:
        return Line.tags(text.split("say:", 1)[1].split("\n", 1)[0].split())
    image = _first_image(body)
    return Line.tags(default_tags(image, decode=False) if image is not None else ["no-image"])


@dataclass
class _Batch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict
    fate: str
    created_at: int
    status: str = "validating"
    polls: int = 0  # retrieves seen in the current status
    custom_ids: list[str] = field(default_factory=list)
    lines: list[dict] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: dict | None = None
    counts: dict = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    times: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": self.errors,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "expires_at": self.created_at + 86400,
            **{f"{k}_at": v for k, v in self.times.items()},
            "request_counts": dict(self.counts), "metadata": self.metadata,
        }


class BatchAPIServer:
    def __init__(self, *, seed: int = 0, steps: dict[str, int] | None = None) -> None:
        self.answer: Callable[[Any, str, int], Line] = say_line
        self.steps = {"validating": 1, "in_progress": 2, "finalizing": 1, "cancelling": 1, **(steps or {})}
        self.fates: list[str] = []
        self.failed_errors = [{"code": "invalid_request", "message": "The model test-model is overloaded for "
                                                                     "batch requests right now", "line": None}]
        self.refuse_creates = 0
        self.refuse_message = "Enqueued token limit reached for test-model in organization org-test."
        self.expire_fraction = 0.5
        self.api_key: str | None = None  # when set, requests without `Bearer <key>` get a 401
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._release = threading.Event()
        self._holds: dict[str, int] = {}
        self.files: dict[str, dict] = {}
        self.contents: dict[str, bytes] = {}
        self.batches: dict[str, _Batch] = {}
        self.order: list[str] = []  # batch ids, oldest first
        self.uploads = self.creates = self.refused = self.downloads = self.retrieves = self.cancels = 0
        self.lists = 0
        self.online = 0  # POST /chat/completions: requests sent online instead
        self.held: list[str] = []
        self.attempts: Counter = Counter()  # custom_id -> lines run
        self.answered: set[str] = set()  # custom_ids answered with a good line
        self.violations: list[str] = []
        self.retrieved_status: Counter = Counter()  # status -> retrieves that returned it
        self.bodies: dict[str, Any] = {}  # custom_id -> the body as last submitted
        self._ids = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- test-facing ---------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def hold_next(self, kind: str, skip: int = 0) -> None:
        """Hold the request of `kind` after the next `skip` ones: `upload` (received, not stored), `upload_reply`
        (stored, no answer), `create` (received, not created), `create_reply` (created, no answer), `retrieve`,
        `content` (half the bytes sent, then nothing)."""
        with self._lock:
            self._holds[kind] = skip

    def start(self) -> "BatchAPIServer":
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="batch-api-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "BatchAPIServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def batch_list(self) -> list[dict]:
        with self._lock:
            return [self.batches[b].as_dict() for b in self.order]

    # -- plumbing --------------------------------------------------------------------------------------------

    def _id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}-{self._ids:04d}"

    def _hold(self, kind: str) -> bool:
        with self._lock:
            if kind not in self._holds:
                return False
            if self._holds[kind] > 0:
                self._holds[kind] -= 1
                return False
            del self._holds[kind]
            self.held.append(kind)
        self._release.wait(timeout=60)
        return True

    def _file(self, data: bytes, filename: str, purpose: str) -> dict:
        fid = self._id("file")
        obj = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
               "filename": filename, "purpose": purpose}
        with self._lock:
            self.files[fid] = obj
            self.contents[fid] = data
        return obj

    # -- batches ---------------------------------------------------------------------------------------------

    def _create(self, body: dict) -> tuple[int, dict]:
        with self._lock:
            fid = body.get("input_file_id")
            if fid not in self.files:
                return 400, _error(f"No such File object: {fid}", "invalid_request_error")
            if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
                return 400, _error("endpoint must be /v1/chat/completions and completion_window 24h")
            if self.refuse_creates > 0:
                self.refuse_creates -= 1
                self.refused += 1
                return 429, _error(self.refuse_message, "rate_limit_error", code="token_limit_exceeded")
            batch = _Batch(id=self._id("batch"), input_file_id=fid, endpoint=body["endpoint"],
                           completion_window=body["completion_window"], metadata=dict(body.get("metadata") or {}),
                           fate=self.fates.pop(0) if self.fates else "completed", created_at=int(time.time()))
            lines = [json.loads(x) for x in self.contents[fid].splitlines() if x.strip()]
            batch.lines = lines
            batch.custom_ids = [x.get("custom_id") for x in lines]
            batch.counts["total"] = len(lines)
            live = {c for b in self.batches.values() if b.status in LIVE for c in b.custom_ids}
            for x in lines:
                cid = x.get("custom_id")
                if cid in live or cid in self.answered:
                    self.violations.append(f"{cid} submitted again in {batch.id}")
                self.bodies[cid] = x.get("body")
            self.batches[batch.id] = batch
            self.order.append(batch.id)
            self.creates += 1
            return 200, batch.as_dict()

    def _retrieve(self, batch_id: str) -> tuple[int, dict]:
        with self._lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                return 404, _error(f"No batch found with id '{batch_id}'.", "invalid_request_error")
            self.retrieves += 1
            batch.polls += 1
            while batch.status in self.steps and batch.polls > self.steps[batch.status]:
                self._advance(batch)
            self.retrieved_status[batch.status] += 1
            return 200, batch.as_dict()

    def _advance(self, batch: _Batch) -> None:
        batch.polls = 1
        now = int(time.time())
        if batch.status == "validating":
            problems = self._validate(batch)
            if problems or batch.fate == "failed":
                batch.status, batch.times["failed"] = "failed", now
                batch.errors = {"object": "list", "data": problems or list(self.failed_errors)}
                return
            batch.status, batch.times["in_progress"] = "in_progress", now
        elif batch.status == "in_progress":
            if batch.fate == "expired":
                self._run(batch, self.expire_fraction, left_code="batch_expired")
                batch.status, batch.times["expired"] = "expired", now
            elif batch.fate == "cancelled":
                batch.status, batch.times["cancelling"] = "cancelling", now
            else:
                batch.status, batch.times["finalizing"] = "finalizing", now
        elif batch.status == "finalizing":
            self._run(batch, 1.0)
            batch.status, batch.times["completed"] = "completed", now
        elif batch.status == "cancelling":
            self._run(batch, 0.5)
            batch.status, batch.times["cancelled"] = "cancelled", now

    def _validate(self, batch: _Batch) -> list[dict]:
        problems, ids = [], set()
        for n, x in enumerate(batch.lines, 1):
            cid = x.get("custom_id")
            if not isinstance(cid, str) or cid in ids:
                problems.append({"code": "duplicate_custom_id", "message": f"custom_id {cid!r} repeats", "line": n})
            ids.add(cid)
            if x.get("method") != "POST" or x.get("url") != batch.endpoint or not isinstance(x.get("body"), dict):
                problems.append({"code": "invalid_request", "message": "bad method, url or body", "line": n})
            elif not x["body"].get("model"):
                problems.append({"code": "missing_required_parameter", "message": "body.model", "line": n})
        return problems

    def _run(self, batch: _Batch, fraction: float, left_code: str | None = None) -> None:
        """Run the first `fraction` of the lines; write the output and error files (lines shuffled)."""
        n = int(len(batch.lines) * fraction + 1e-9)
        out, err = [], []
        for k, x in enumerate(batch.lines):
            cid = x["custom_id"]
            rid = f"batch_req_{self._ids}_{k}"
            if k >= n:
                if left_code:
                    err.append({"id": rid, "custom_id": cid, "response": None,
                                "error": {"code": left_code, "message": "This request could not be executed "
                                                                        "before the completion window expired."}})
                continue
            self.attempts[cid] += 1
            line = self.answer(x["body"], cid, self.attempts[cid])
            if line.status != 200:
                err.append({"id": rid, "custom_id": cid, "response": {
                    "status_code": line.status, "request_id": rid,
                    "body": {"error": {"message": line.message, "type": "server_error", "param": None,
                                       "code": None}}}, "error": None})
                batch.counts["failed"] += 1
                continue
            content = line.content if line.content is not None else tags_content(["no-answer"])
            usage = line.usage or {"prompt_tokens": len(json.dumps(x["body"])) // 100 + 20,
                                   "completion_tokens": len(content) // 4 + 1}
            usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
            out.append({"id": rid, "custom_id": cid, "response": {
                "status_code": 200, "request_id": rid, "body": {
                    "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()),
                    "model": x["body"].get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}], "usage": usage}}, "error": None})
            batch.counts["completed"] += 1
            if line.good:
                self.answered.add(cid)
        self._rng.shuffle(out)
        self._rng.shuffle(err)
        if out:
            batch.output_file_id = self._file(_jsonl(out), f"{batch.id}_output.jsonl", "batch_output")["id"]
        if err:
            batch.error_file_id = self._file(_jsonl(err), f"{batch.id}_error.jsonl", "batch_output")["id"]

    def _cancel(self, batch_id: str) -> tuple[int, dict]:
        with self._lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                return 404, _error(f"No batch found with id '{batch_id}'.")
            self.cancels += 1
            if batch.status in ("validating", "in_progress", "finalizing"):
                batch.status, batch.polls = "cancelling", 0
                batch.times["cancelling"] = int(time.time())
            return 200, batch.as_dict()


def _jsonl(docs: list[dict]) -> bytes:
    return "".join(json.dumps(d) + "\n" for d in docs).encode()


def _error(message: str, type_: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class _Handler(BaseHTTPRequestHandler):
    owner: BatchAPIServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without this, Nagle and delayed ACKs add ~40 ms to each call
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, obj: Any, *, headers: dict | None = None) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not isinstance(obj, bytes) else
                         "application/octet-stream")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorized(self) -> bool:
        key = self.owner.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._send(401, _error("Incorrect API key provided", "invalid_api_key"))
        return False

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.close()
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's names
        s = self.owner
        url = urlparse(self.path)
        parts = url.path.rstrip("/").split("/")[2:]  # after /v1
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if not self._authorized():
            return
        if parts == ["files"]:
            with s._lock:
                s.lists += 1
                data = [f for f in s.files.values() if f["purpose"] == query.get("purpose", f["purpose"])]
            return self._send(200, {"object": "list", "data": data[::-1], "has_more": False})
        if len(parts) == 2 and parts[0] == "files":
            f = s.files.get(parts[1])
            return self._send(200, f) if f else self._send(404, _error(f"No such File object: {parts[1]}"))
        if len(parts) == 3 and parts[0] == "files" and parts[2] == "content":
            data = s.contents.get(parts[1])
            if data is None:
                return self._send(404, _error(f"No such File object: {parts[1]}"))
            with s._lock:
                s.downloads += 1
            if "content" in s._holds:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                if s._hold("content"):
                    return self._drop()
                self.wfile.write(data[len(data) // 2:])
                return
            return self._send(200, data)
        if parts == ["batches"]:
            with s._lock:
                s.lists += 1
                ids = s.order[::-1]
                if query.get("after") in ids:
                    ids = ids[ids.index(query["after"]) + 1:]
                limit = int(query.get("limit", 20))
                page = [s.batches[b].as_dict() for b in ids[:limit]]
            return self._send(200, {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                                    "last_id": page[-1]["id"] if page else None, "has_more": len(ids) > limit})
        if len(parts) == 2 and parts[0] == "batches":
            if s._hold("retrieve"):
                return self._drop()
            status, obj = s._retrieve(parts[1])
            return self._send(status, obj)
        self._send(404, _error(f"no route GET {url.path}"))

    def do_POST(self) -> None:  # noqa: N802
        s = self.owner
        url = urlparse(self.path)
        parts = url.path.rstrip("/").split("/")[2:]
        raw = self._body()
        if not self._authorized():
            return
        if parts == ["files"]:
            if s._hold("upload"):
                return self._drop()
            ctype = self.headers.get("Content-Type", "")
            message = email.parser.BytesParser().parsebytes(
                b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw)
            fields, filename, content = {}, None, None
            for part in message.get_payload() if message.is_multipart() else []:
                name = part.get_param("name", header="content-disposition")
                if part.get_filename() is not None:
                    filename, content = part.get_filename(), part.get_payload(decode=True)
                else:
                    fields[name] = part.get_payload(decode=True).decode()
            if content is None or fields.get("purpose") != "batch":
                return self._send(400, _error("expected multipart fields purpose=batch and file"))
            obj = s._file(content, filename or "upload.jsonl", "batch")
            with s._lock:
                s.uploads += 1
            if s._hold("upload_reply"):
                return self._drop()
            return self._send(200, obj)
        if parts == ["batches"]:
            if s._hold("create"):
                return self._drop()
            status, obj = s._create(json.loads(raw or b"{}"))
            if status == 200 and s._hold("create_reply"):
                return self._drop()
            headers = {"Retry-After": "0.05"} if status == 429 else None
            return self._send(status, obj, headers=headers)
        if parts == ["chat", "completions"]:
            body = json.loads(raw or b"{}")
            with s._lock:
                s.online += 1
            line = s.answer(body, "", 0)
            if line.status != 200:
                return self._send(line.status, _error(line.message, "server_error"))
            return self._send(200, {"id": "chatcmpl-online", "object": "chat.completion", "model": body.get("model"),
                                    "choices": [{"index": 0, "message": {"role": "assistant", "content": line.content},
                                                 "finish_reason": "stop"}],
                                    "usage": line.usage or {"prompt_tokens": 10, "completion_tokens": 5}})
        if len(parts) == 3 and parts[0] == "batches" and parts[2] == "cancel":
            status, obj = s._cancel(parts[1])
            return self._send(status, obj)
        self._send(404, _error(f"no route POST {url.path}"))
