"""Result lines, as the OpenAI Batch API, DashScope and `vllm run-batch` write them, read back into one outcome per
`custom_id`:

    {"id": "batch_req_..", "custom_id": "..", "response": {"status_code": 200, "request_id": "..",
     "body": {chat completion}}, "error": null}
    {"id": "batch_req_..", "custom_id": "..", "response": {"status_code": 500, "body": {"error": {...}}}, ...}
    {"id": "batch_req_..", "custom_id": "..", "response": null, "error": {"code": "batch_expired", "message": ..}}
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Iterator

from vlmtag.engines.api import DEFAULT_RESPONSE_PATH, RETRYABLE_STATUSES, MissingAnswer, extract, server_message

log = logging.getLogger(__name__)

#: Error codes of requests the provider never ran (the batch ended first): asked again, no attempt counted.
NOT_RUN = frozenset({"batch_expired", "batch_cancelled", "batch_failed"})


@dataclass
class LineOutcome:
    custom_id: str
    text: str | None = None  # the answer (status 2xx, something at the response path)
    error: str | None = None
    retryable: bool = False
    status: int | None = None
    not_run: bool = False  # the batch ended before this request ran: ask again without spending an attempt
    prompt_tokens: int = 0
    completion_tokens: int = 0


def read_lines(path: str) -> Iterator[dict]:
    """The JSON objects of a result file; a line that is not one is skipped with a warning."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                doc = json.loads(raw)
            except ValueError:
                log.warning("%s line %d is not JSON; skipped", path, number)
                continue
            if isinstance(doc, dict) and isinstance(doc.get("custom_id"), str):
                yield doc
            else:
                log.warning("%s line %d has no custom_id; skipped", path, number)


def outcome(doc: dict, response_path: str | None = None) -> LineOutcome:
    """What one result line says about its request."""
    out = LineOutcome(custom_id=doc["custom_id"])
    response, error = doc.get("response"), doc.get("error")
    if isinstance(response, dict) and response.get("status_code") is not None:
        try:
            status = int(response["status_code"])
        except (TypeError, ValueError):
            status = 0
        body = response.get("body")
        if isinstance(body, str):
            try:
                body = json.loads(body)
            except ValueError:
                pass
        out.status = status
        out.prompt_tokens, out.completion_tokens = _usage(body)
        if 200 <= status < 300:
            try:
                out.text = extract(body, response_path or DEFAULT_RESPONSE_PATH)
            except MissingAnswer as e:
                out.error, out.retryable = str(e), True
            return out
        message = _message(body) or _message({"error": error}) or ""
        out.error = f"HTTP {status}: {message}" if message else f"HTTP {status}"
        out.retryable = status in RETRYABLE_STATUSES or status >= 500
        return out
    if isinstance(error, dict):
        code = str(error.get("code") or "")
        if code in NOT_RUN:
            out.not_run = True
            return out
        message = str(error.get("message") or "")
        out.error = f"{code}: {message}" if code and message else (message or code or "error")
    else:
        out.error = f"error: {error}" if error else "no response in the result line"
    out.retryable = True
    return out


def _message(body: Any) -> str:
    if body is None:
        return ""
    return server_message(json.dumps(body).encode() if not isinstance(body, (bytes, str)) else
                          (body.encode() if isinstance(body, str) else body))


def _usage(body: Any) -> tuple[int, int]:
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0, 0

    def count(key: str) -> int:
        value = usage.get(key)
        return int(value) if isinstance(value, (int, float)) and value >= 0 else 0

    return count("prompt_tokens"), count("completion_tokens")
