"""A job's state on disk, so a run killed at any moment resumes where it stopped.

Each finished input batch is written as a chunk file (to a temporary name, then renamed: a chunk either
exists whole or not at all). The chunk files are the progress record: on a rerun, batches whose chunk exists
are skipped. When every batch is done, the chunks are merged into the export (again via a temporary file and a
rename), a `complete.json` marker is written and the chunks are deleted.

Chunks are JSON lines; bytes values are stored as `{"__vlmtag_b64__": "..."}` so they round-trip exactly.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from typing import Any, Iterator

from vlmtag.atomic import write_text

_B64 = "__vlmtag_b64__"


def _encode(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {_B64: base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"cannot store a {type(value).__name__} in a chunk")


def _decode(obj: dict) -> Any:
    if len(obj) == 1 and _B64 in obj:
        return base64.b64decode(obj[_B64])
    return obj


def job_id(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Job:
    def __init__(self, root: str, identity: dict) -> None:
        self.id = job_id(identity)
        self.dir = os.path.join(root, "jobs", self.id)
        self.chunk_dir = os.path.join(self.dir, "chunks")
        os.makedirs(self.chunk_dir, exist_ok=True)
        meta = os.path.join(self.dir, "job.json")
        if not os.path.exists(meta):
            write_text(meta, json.dumps(identity, indent=2, sort_keys=True, default=str) + "\n", fsync=True)
        self._done = {name for name in os.listdir(self.chunk_dir) if name.endswith(".jsonl")}

    def _name(self, shard: int, batch: int) -> str:
        return f"{shard:05d}-{batch:08d}.jsonl"

    def is_done(self, shard: int, batch: int) -> bool:
        return self._name(shard, batch) in self._done

    def write_chunk(self, shard: int, batch: int, rows: list[dict]) -> None:
        name = self._name(shard, batch)
        text = "".join(json.dumps(r, ensure_ascii=False, default=_encode) + "\n" for r in rows)
        write_text(os.path.join(self.chunk_dir, name), text, fsync=True)
        self._done.add(name)

    def read_shard(self, shard: int) -> Iterator[list[dict]]:
        """The finished rows of one input shard, chunk by chunk, in input order."""
        prefix = f"{shard:05d}-"
        for name in sorted(n for n in self._done if n.startswith(prefix)):
            with open(os.path.join(self.chunk_dir, name), encoding="utf-8") as f:
                yield [json.loads(line, object_hook=_decode) for line in f]

    @property
    def complete_path(self) -> str:
        return os.path.join(self.dir, "complete.json")

    def completed(self) -> dict | None:
        try:
            with open(self.complete_path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def restart(self) -> None:
        """Forget that the job finished, so it runs again from the first batch."""
        if os.path.exists(self.complete_path):
            os.remove(self.complete_path)
        os.makedirs(self.chunk_dir, exist_ok=True)

    def mark_complete(self, info: dict) -> None:
        write_text(self.complete_path, json.dumps(info, indent=2, default=str) + "\n", fsync=True)
        shutil.rmtree(self.chunk_dir, ignore_errors=True)
        self._done.clear()

