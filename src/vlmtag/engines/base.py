"""The one interface every engine implements: a batch of requests in, a batch of responses out.

Engines are transports (API, vLLM, HF transformers, embedded). They know nothing of datasets, retries,
parsing or caching: the operator owns all of that, once, above them.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from vlmtag.defaults import DEFAULT_MAX_PIXELS
from vlmtag.images.encoded import EncodedImage


@dataclass(frozen=True)
class Request:
    """One image to tag: the prepared image plus the two prompt texts."""

    image: EncodedImage
    system_prompt: str
    user_text: str


def chat_messages(request: Request, image_url: str | None = None) -> list[dict[str, Any]]:
    """One image's chat in the OpenAI message format (what API servers and vLLM's `LLM.chat` read):
    the system prompt (left out when empty), then the user's text part and image part (the image's data URL,
    or `image_url` in its place)."""
    messages: list[dict[str, Any]] = []
    if request.system_prompt:
        messages.append({"role": "system", "content": request.system_prompt})
    messages.append(
        {
            "role": "user",
            "content": [
                {"type": "text", "text": request.user_text},
                {"type": "image_url", "image_url": {"url": image_url or request.image.data_url()}},
            ],
        }
    )
    return messages


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Response:
    """The outcome of one attempt at one request.

    Exactly one of `text` / `error` is set. `retryable` and `retry_after` classify a failure; the
    operator decides whether to spend another attempt on it.
    """

    text: str | None = None
    error: str | None = None
    retryable: bool = False
    retry_after: float | None = None
    status: int | None = None
    usage: Usage = field(default_factory=Usage)
    #: The server could not be reached at all (connection refused, a name that does not resolve): a wrong
    #: address, not a bad image. The operator stops the run when a whole first round is unreachable.
    unreachable: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


#: `model_params` keys that configure the API client, not the answer: the API engine reads them, and they are
#: left out of cache keys and job identity (and never stored). `max_retries` is what Data-Juicer passes to its
#: openai.OpenAI client: accepted and ignored, because the operator owns retries (see try_num).
CLIENT_PARAMS = frozenset({"base_url", "api_key", "timeout", "max_retries", "headers", "default_headers",
                           "default_query", "organization", "project"})


@dataclass
class EngineSettings:
    """Everything an engine may need, taken from the operator's arguments."""

    model: str
    kind: str  # "api" | "embedded" | "hf" | "vllm"
    model_params: dict[str, Any] = field(default_factory=dict)
    sampling_params: dict[str, Any] = field(default_factory=dict)
    api_endpoint: str | None = None
    response_path: str | None = None
    concurrency: int = 32
    json_schema: dict[str, Any] | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_requests_per_minute: float | None = None
    max_tokens_per_minute: float | None = None


class EngineError(RuntimeError):
    """An engine cannot be built or used at all (bad settings, missing model, missing extra)."""


#: Called once with the response of a request given to `Engine.send`, on a thread of the engine's choosing.
OnResponse = Callable[[Response], None]


class Engine(abc.ABC):
    """Batch-in/batch-out inference. Thread-safe: executors may call `generate` from several threads.

    Engines that send requests one by one (`streams`: the API engine) also take them one at a time: `encode`
    turns a request into what goes on the wire (once, so a retry sends the same bytes) and `send` starts it
    without waiting, so the operator can send each request as soon as its image is ready.
    """

    kind: str = "abstract"
    streams: bool = False

    def encode(self, request: Request) -> Any:
        """A streaming engine's wire form of `request`; raises ValueError when it cannot be built."""
        raise NotImplementedError(f"the {self.kind} engine works in batches (generate)")

    def send(self, items: Sequence[tuple[Any, OnResponse]]) -> None:
        """Start each `(encoded request, on_response)` without waiting; `on_response` is called exactly once."""
        raise NotImplementedError(f"the {self.kind} engine works in batches (generate)")

    @abc.abstractmethod
    def generate(self, requests: Sequence[Request]) -> list[Response]:
        """Return one `Response` per request, same order. Per-request failures are responses, not raises."""

    def run_batch(self, requests: Sequence[Request], on_response: Callable[[int, Response], None]) -> list[Response]:
        """`generate`, also calling `on_response(index, response)` for each response. Engines that finish
        requests one by one (the API engine) override this to call it as each arrives."""
        responses = self.generate(requests)
        for i, response in enumerate(responses):
            on_response(i, response)
        return responses

    def start(self) -> None:  # noqa: B027 - optional hook
        """Get ready to send (threads, connections) ahead of the first request, so that it does not wait for
        them. Optional, idempotent; a failure here is raised again by the first `send` or `generate`."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients, threads or models."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
