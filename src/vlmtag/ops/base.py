"""What the run, the executors and the dry run may use of an operator (`Operator`), and how a recipe's operators
run as one (`Pipeline`).

Nothing above `ops/` reaches past this interface into a concrete operator class. An operator works on rows only:
it opens no dataset, knows nothing of executors, jobs or where its cache lives (one is attached to it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

from vlmtag.stats import TaggingStats

if TYPE_CHECKING:
    from vlmtag.cache.base import AnswerCache
    from vlmtag.cost import Pricing

#: How to build an operator again in another process: (registered name, keyword arguments).
OpSpec = tuple[str, dict]


@dataclass(frozen=True)
class Resources:
    """What one copy of an operator asks an executor for (Data-Juicer's per-op keys); None = not set."""

    num_proc: int | None = None  # copies to run (Data-Juicer's per-op override of the recipe's `np`)
    num_cpus: float | None = None
    num_gpus: float | None = None
    accelerator: str | None = None  # "cpu" | "cuda" | None
    local_model: bool = False  # runs a model in its own process (hf, vllm), rather than calling a server
    gpus_per_model: int = 1  # GPUs one model copy spans (vLLM's tensor_parallel_size)
    is_api: bool = False  # an API client: one process keeps many requests in flight


@runtime_checkable
class Operator(Protocol):
    """A step that takes a batch of rows and gives back the same rows, in order, with its fields set.

    Optional: `start()`, called after `setup` in a process that will run batches, begins in the background what
    the first batch would otherwise wait for (the API engine's client)."""

    name: str
    spec: OpSpec
    tag_field_name: str
    batch_size: int
    stats: TaggingStats
    pricing: "Pricing"
    resources: Resources

    @property
    def fingerprint(self) -> str:
        """A hash of every setting that changes the answers (job identity, cache keys)."""

    def attach_cache(self, cache: "AnswerCache | None") -> None:
        """Use `cache` for answers from now on (None: no cache)."""

    def setup(self) -> None:
        """Build what the operator needs (its engine), so a bad setting fails before any data is read."""

    def close(self) -> None:
        """Release the engine and threads. Closing twice is harmless."""

    def process_rows(self, rows: list[dict], *, base_dir: str | None = None) -> list[dict]:
        """The rows, same order and keys, with this operator's fields set. Relative paths resolve against
        `base_dir`."""

    def provenance(self) -> dict[str, Any]:
        """What produced the output (model, engine, prompt hash, ...), for the stats file; never client settings."""

    def spent(self) -> float:
        """What the answers so far cost, from the server's token counts (0 without prices)."""


class Pipeline:
    """A recipe's operators, run one after another on each batch. Every rule for more than one operator is here:

    - a batch is the smallest `batch_size` any of them asks for;
    - counters (rows, images, requests, tokens, ...) are summed over the operators: with two taggers, an image
      counts once per tagger;
    - the cost is the sum of their costs, known when any of them has prices.
    """

    def __init__(self, ops: Sequence[Operator]) -> None:
        if not ops:
            raise ValueError("a pipeline needs at least one operator")
        self.ops = list(ops)

    def __iter__(self):
        return iter(self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    @property
    def batch_size(self) -> int:
        return min(op.batch_size for op in self.ops)

    @property
    def tag_fields(self) -> list[str]:
        return [op.tag_field_name for op in self.ops]

    @property
    def fingerprints(self) -> list[str]:
        return [op.fingerprint for op in self.ops]

    @property
    def specs(self) -> list[OpSpec]:
        return [op.spec for op in self.ops]

    def counters(self) -> dict:
        """The operators' counters, summed (the form of `TaggingStats.as_dict`)."""
        total = TaggingStats()
        for op in self.ops:
            total.merge(op.stats.as_dict())
        return total.as_dict()

    def cost(self) -> float | None:
        """What the run spent so far; None when no operator has prices."""
        if not any(op.pricing.known for op in self.ops):
            return None
        return sum(op.spent() for op in self.ops)

    def provenance(self) -> list[dict]:
        return [op.provenance() for op in self.ops]

    def attach_cache(self, cache: "AnswerCache | None") -> None:
        for op in self.ops:
            op.attach_cache(cache)

    def setup(self) -> None:
        for op in self.ops:
            op.setup()

    def start(self) -> None:
        """Each operator's optional `start` (see `Operator`)."""
        for op in self.ops:
            start = getattr(op, "start", None)
            if start is not None:
                start()

    def close(self) -> None:
        for op in self.ops:
            op.close()

    def process_rows(self, rows: list[dict], *, base_dir: str | None = None) -> list[dict]:
        for op in self.ops:
            rows = op.process_rows(rows, base_dir=base_dir)
        return rows
