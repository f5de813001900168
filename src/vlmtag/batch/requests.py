"""Request lines and request files: each distinct image+prompt the job still needs becomes one line
(`custom_id` = the operator's cache key, `body` = exactly what the online API engine sends), and lines are split
into files under `batch_max_requests` and `batch_max_bytes`."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator

from vlmtag.batch.client import CHAT_ENDPOINT
from vlmtag.engines.base import EngineSettings, Request
from vlmtag.io import Shard
from vlmtag.jobs import Job
from vlmtag.run.plan import iter_batches

log = logging.getLogger(__name__)


def request_line(custom_id: str, request: Request, settings: EngineSettings) -> bytes:
    """One line of a Batch API input file (and of `vllm run-batch -i`)."""
    from vlmtag.engines.api import build_body

    line = {"custom_id": custom_id, "method": "POST", "url": CHAT_ENDPOINT, "body": build_body(request, settings)}
    return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


@dataclass
class SealedFile:
    n: int
    path: str
    keys: list[str]
    bytes: int


class RequestFiles:
    """Writes lines into numbered files, starting a new one before a line would take the current one past
    `max_requests` lines or `max_bytes` bytes; `on_seal` gets each file once it is whole on disk (with its
    `custom_id`s beside it in `<name>.keys` when `keys_file`)."""

    def __init__(self, folder: str, first: int, *, max_requests: int, max_bytes: int,
                 name: Callable[[int], str], on_seal: Callable[[SealedFile], None], keys_file: bool = True) -> None:
        self.folder, self.n, self.keys_file = folder, first, keys_file
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.name, self.on_seal = name, on_seal
        self._f = None
        self._keys: list[str] = []
        self._bytes = 0
        os.makedirs(folder, exist_ok=True)

    @property
    def path(self) -> str:
        return os.path.join(self.folder, self.name(self.n))

    def add(self, custom_id: str, line: bytes) -> None:
        if self._f is not None and (len(self._keys) + 1 > self.max_requests
                                    or self._bytes + len(line) > self.max_bytes):
            self.seal()
        if len(line) > self.max_bytes:
            log.warning("one request line is %d bytes, more than batch_max_bytes=%d: it goes in a file of its own "
                        "(lower max_pixels to make it smaller)", len(line), self.max_bytes)
        if self._f is None:
            self._f = open(self.path, "wb")  # a file a crash left half-written is written again from the start
        self._f.write(line)
        self._keys.append(custom_id)
        self._bytes += len(line)

    def seal(self) -> None:
        if self._f is None:
            return
        f, self._f = self._f, None
        f.flush()
        os.fsync(f.fileno())
        f.close()
        if self.keys_file:
            with open(os.path.splitext(self.path)[0] + ".keys", "w", encoding="utf-8") as k:
                k.write("".join(key + "\n" for key in self._keys))
                k.flush()
                os.fsync(k.fileno())
        sealed = SealedFile(self.n, self.path, self._keys, self._bytes)
        self._keys, self._bytes = [], 0
        self.n += 1
        self.on_seal(sealed)

    def close(self) -> None:
        """Seal the last file (if it has lines)."""
        self.seal()

    def abandon(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def walk(op, shards: list[Shard], job: Job, *, limit: int | None, want: Callable[[str], bool],
         stop: Callable[[], None] | None = None) -> Iterator[tuple[int, int, int, object]]:
    """(shard, read batch, first row number, `BatchWork`) over the rows the job has not finished, in order."""
    first_row = 0
    for s, b, rows in iter_batches(shards, op.batch_size, limit):
        if stop is not None:
            stop()
        start, first_row = first_row, first_row + len(rows)
        if job.is_done(s, b):
            continue
        yield s, b, start, op.batch_requests(rows, base_dir=shards[s].base_dir, want=want)
