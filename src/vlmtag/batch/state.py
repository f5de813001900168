"""A job's batch state on disk, `<job folder>/batch/`, so a batch job survives a kill and resumes days later on
any machine with the same `work_dir`.

- `state.json`: the request files, each with its file id and batch id (checkpointed the moment the provider
  returns them, and flagged before the call, so a reply lost in a crash is looked up instead of paid again);
  attempts per `custom_id`, final errors, and the tokens of every result line. Rewritten whole, atomically.
- `requests/NNNNN.keys`: the `custom_id`s of request file NNNNN, one a line (what is in which batch).
- `requests/NNNNN.jsonl`: the request file itself, until its batch is created.
- `rows.jsonl`: the `custom_id` of every image of every row (`{"shard", "batch", "first_row", "keys"}` per read
  batch): the map from requests back to rows.
- `results/`: downloaded output and error files, until they are ingested.
- `cancel.json`: written by `vlmtag batch cancel`; a run started before it stops after taking what completed.

Only the run writes `state.json`; `vlmtag batch status` and `cancel` only read it, so neither needs a lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable, Iterator

from vlmtag.atomic import write_text
from vlmtag.errors import ConfigError

#: Statuses after which a batch changes no more.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass
class FileEntry:
    """One request file and its batch."""

    n: int  # number: requests/NNNNN.jsonl
    round: int  # 1 for the first requests of each image+prompt, then one more per follow-up
    requests: int
    bytes: int
    file_id: str | None = None
    uploading: bool = False  # an upload was started (after a crash, look for it before uploading again)
    batch_id: str | None = None
    creating: bool = False  # a create was started (likewise)
    status: str | None = None  # the provider's status, as last seen
    counts: dict = field(default_factory=dict)  # the provider's request_counts, as last seen
    created_at: float | None = None
    ingested: bool = False  # its results are in the cache and the counts below

    @property
    def name(self) -> str:
        return f"{self.n:05d}"

    @property
    def live(self) -> bool:
        """Its requests may still be answered (not yet ingested)."""
        return not self.ingested

    @classmethod
    def from_dict(cls, d: dict) -> "FileEntry":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Usage:
    """What the job's batches did, over every run of it."""

    requests: int = 0  # result lines (attempts answered or failed by the provider)
    retries: int = 0  # of those, second and later attempts
    answered: int = 0  # good answers stored in the cache
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batches: int = 0  # batches ingested


class BatchState:
    def __init__(self, folder: str) -> None:
        self.dir = folder
        self.requests_dir = os.path.join(folder, "requests")
        self.results_dir = os.path.join(folder, "results")
        self.path = os.path.join(folder, "state.json")
        self.round = 1
        self.walk_complete = False  # the current round's walk over the dataset finished
        self.retry = 0  # requests of ingested batches waiting for a follow-up batch
        self.files: list[FileEntry] = []
        self.attempts: dict[str, int] = {}  # custom_id -> attempts the provider answered with a failure
        self.final: dict[str, str] = {}  # custom_id -> final error (attempts spent, or not worth another)
        self.usage = Usage()
        self.exists = os.path.exists(self.path)
        if self.exists:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
            self.round = int(doc.get("round", 1))
            self.walk_complete = bool(doc.get("walk_complete"))
            self.retry = int(doc.get("retry", 0))
            self.files = [FileEntry.from_dict(d) for d in doc.get("files", [])]
            self.attempts = dict(doc.get("attempts", {}))
            self.final = dict(doc.get("final", {}))
            self.usage = Usage(**{k: v for k, v in doc.get("usage", {}).items() if k in Usage.__dataclass_fields__})

    def save(self) -> None:
        doc = {
            "version": 1, "round": self.round, "walk_complete": self.walk_complete, "retry": self.retry,
            "files": [asdict(f) for f in self.files], "usage": asdict(self.usage),
            "attempts": self.attempts, "final": self.final, "saved": time.time(),
        }
        os.makedirs(self.requests_dir, exist_ok=True)
        write_text(self.path, json.dumps(doc, separators=(",", ":")) + "\n", fsync=True)
        self.exists = True

    # -- rounds ----------------------------------------------------------------------------------------------

    def new_round(self) -> None:
        """Ask again for what the finished batches did not answer (a walk finds it)."""
        self.round += 1
        self.walk_complete = False
        self.retry = 0
        self.save()

    def forget_final(self) -> None:
        """A finished job with failures runs again: its failed requests get `try_num` new attempts, and a new walk
        finds what is missing (images that could not be read then may be readable now)."""
        self.final, self.attempts = {}, {}
        self.new_round()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Held by the run that submits and polls (released when it ends or dies), so two runs of the same job
        never submit the same requests twice. Status and cancel do not take it."""
        try:
            import fcntl
        except ImportError:  # not on this platform: no lock
            yield
            return
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "run.lock"), "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise ConfigError("another vlmtag run is submitting or polling this job's batches right now; let it "
                                  "finish (`vlmtag batch status` shows them) or stop it first") from None
            yield

    # -- files -------------------------------------------------------------------------------------------------

    def request_path(self, entry: FileEntry) -> str:
        return os.path.join(self.requests_dir, f"{entry.name}.jsonl")

    def keys_path(self, entry: FileEntry) -> str:
        return os.path.join(self.requests_dir, f"{entry.name}.keys")

    def keys(self, entry: FileEntry) -> list[str]:
        with open(self.keys_path(entry), encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]

    def live(self) -> list[FileEntry]:
        return [f for f in self.files if f.live]

    def live_keys(self) -> set[str]:
        keys: set[str] = set()
        for entry in self.live():
            keys.update(self.keys(entry))
        return keys

    # -- the rows map -----------------------------------------------------------------------------------------

    @property
    def rows_path(self) -> str:
        return os.path.join(self.dir, "rows.jsonl")

    def rows_recorded(self) -> set[tuple[int, int]]:
        """The read batches whose rows are in `rows.jsonl` (a line cut by a crash does not count)."""
        done = set()
        for doc in self.read_rows():
            done.add((doc["shard"], doc["batch"]))
        return done

    def read_rows(self) -> Iterator[dict]:
        try:
            f = open(self.rows_path, encoding="utf-8")
        except FileNotFoundError:
            return
        with f:
            for line in f:
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if isinstance(doc, dict) and "shard" in doc and "batch" in doc:
                    yield doc

    def record_rows(self, lines: Iterable[dict]) -> None:
        text = "".join(json.dumps(d, separators=(",", ":")) + "\n" for d in lines)
        if not text:
            return
        os.makedirs(self.dir, exist_ok=True)
        with open(self.rows_path, "a+b") as f:
            if f.tell() and (f.seek(f.tell() - 1), f.read(1))[1] != b"\n":
                text = "\n" + text  # a line cut by a crash stays apart (and is skipped when read)
            f.write(text.encode("utf-8"))

    # -- cancel --------------------------------------------------------------------------------------------------

    @property
    def cancel_path(self) -> str:
        return os.path.join(self.dir, "cancel.json")

    def cancelled_since(self, started: float) -> bool:
        """Whether `vlmtag batch cancel` ran after `started` (a run started later goes on)."""
        try:
            with open(self.cancel_path, encoding="utf-8") as f:
                return float(json.load(f).get("time", 0)) >= started
        except (OSError, ValueError, AttributeError):
            return False

    def request_cancel(self) -> None:
        write_text(self.cancel_path, json.dumps({"time": time.time()}) + "\n", fsync=True)
