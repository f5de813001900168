"""Counters and the stats document, each defined once.

`TaggingStats` are the live counters an operator fills while it works (threads add to them; worker processes
send theirs back to the driver). `RunStats` is the schema of `<export>.stats.json`: the run writes it, and the
summary, the progress line and the report read it, so a counter has one name everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vlmtag.atomic import write_text


def reason_kind(error: str) -> str:
    """Group errors for the summary: the part before the first ':' (errors read "<kind>: <detail>")."""
    head = error.split(":", 1)[0].strip()
    return head[:80] or "error"


@dataclass
class TaggingStats:
    """What an operator counted while it worked."""

    rows: int = 0
    rows_skipped: int = 0  # already had the tag field
    rows_unreadable: int = 0  # kept in place with why they could not be read (not JSON, not UTF-8, damaged shard)
    prompts_cut: int = 0  # texts longer than `max_text_chars`, cut in the prompt
    images: int = 0
    tagged: int = 0
    cached: int = 0  # answers taken from the cache (no request)
    failed: int = 0
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failure_reasons: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def add_failure(self, error: str) -> None:
        with self._lock:
            self.failed += 1
            self.failure_reasons[reason_kind(error)] += 1

    def merge(self, other: dict) -> None:
        """Add counters reported by a worker (another process or a Ray actor), as given by `as_dict`."""
        with self._lock:
            for name, value in other.items():
                if name == "failure_reasons":
                    self.failure_reasons.update(value)
                elif isinstance(value, int):
                    setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict:
        with self._lock:
            d = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
            d["failure_reasons"] = dict(self.failure_reasons.most_common())
            return d


@dataclass
class RunStats:
    """`<export>.stats.json`. Counts of the export come from the rows as written (so a resumed job reports the
    whole export); the `*_processed`, request and token counts are what this run did. Never a key or client
    setting."""

    # the export, counted from its rows
    rows: int = 0
    images: int = 0
    tagged: int = 0
    failed: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    unreadable_rows: int = 0  # rows kept in place that could not be read (their tags are [[]])
    first_unreadable: str | None = None  # where the first one is and why, e.g. "in.jsonl line 3: invalid JSON ..."
    # this run
    rows_processed: int = 0  # rows this run finished (checkpointed)
    rows_resumed: int = 0  # done by an earlier, interrupted run of the same job
    rows_already_tagged: int = 0  # had the tag field in the input; kept as they were
    images_processed: int = 0
    prompts_cut: int = 0  # sample texts cut to `max_text_chars` in the prompt
    cached: int = 0
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None  # from the server's token counts; None without prices
    wall_seconds: float = 0.0
    # where things are
    export_path: str = ""
    dataset_path: str = ""
    images_root: str | None = None  # the folder relative image paths resolved against, when there was one
    parts: list[dict] = field(default_factory=list)  # per output: {output, shard, images_root}
    rows_written: int = 0
    completed: bool = False
    provenance: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images_processed / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def take_counters(self, counters: dict) -> None:
        """This run's counts from the operators' counters (`TaggingStats.as_dict()`): the one place their names
        are mapped. Until the export is written, its counts (tagged, failed, reasons) are this run's."""
        self.rows_already_tagged = counters.get("rows_skipped", 0)
        self.unreadable_rows = counters.get("rows_unreadable", 0)
        self.images_processed = counters.get("images", 0)
        self.prompts_cut = counters.get("prompts_cut", 0)
        for name in ("tagged", "failed", "cached", "requests", "retries", "prompt_tokens", "completion_tokens"):
            setattr(self, name, counters.get(name, 0))
        self.failure_reasons = dict(counters.get("failure_reasons") or {})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["cost"] is None:
            del d["cost"]
        else:
            d["cost"] = round(d["cost"], 6)
        d["wall_seconds"] = round(self.wall_seconds, 3)
        d["images_per_second"] = round(self.images_per_second, 3)
        return d

    @classmethod
    def from_dict(cls, doc: dict) -> "RunStats":
        """Read a stats document; unknown keys are ignored and values of the wrong type left at their default
        (the file may be hand-edited or come from another version)."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in doc:
                continue
            if _accepts(str(f.type), doc[f.name]):
                kwargs[f.name] = doc[f.name]
        return cls(**kwargs)

    def write(self, path: str) -> None:
        write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str) + "\n")

    @classmethod
    def read(cls, path: str) -> "RunStats":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "list": (list,)}


def _accepts(annotation: str, value: Any) -> bool:
    """Whether `value` fits a field annotated `annotation` (a string such as "float | None" or "dict[str, int]")."""
    if value is None:
        return "None" in annotation
    base = annotation.split("[", 1)[0].split("|", 1)[0].strip()
    if isinstance(value, bool) != (base == "bool"):
        return False
    return isinstance(value, _KINDS.get(base, (object,)))
