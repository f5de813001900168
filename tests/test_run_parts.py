"""The run's parts on their own: plan, execute, finalize and the stats schema, with a small real operator
(the fake below implements the operator interface; the executor, the job and the writers are the real ones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmtag.cli import main
from vlmtag.cost import Pricing
from vlmtag.errors import ConfigError
from vlmtag.executors import LocalExecutor
from vlmtag.io import open_dataset
from vlmtag.jobs import Job
from vlmtag.ops import RunAborted
from vlmtag.ops.base import Operator, Pipeline, Resources
from vlmtag.report import write_report
from vlmtag.rowkeys import META_KEY
from vlmtag.run import plan, run_job
from vlmtag.run.execute import execute
from vlmtag.run.finalize import finalize
from vlmtag.run.plan import iter_batches, job_identity
from vlmtag.stats import RunStats, TaggingStats


class WordTagger:
    """Tags each row with the words of its text; a row whose text is "fail" gets an error; "abort" stops."""

    name = "word_tagger"
    batch_size = 2
    pricing = Pricing(1.0, 2.0)
    resources = Resources()
    fingerprint = "word-tagger-v1"

    def __init__(self, tag_field_name: str = "image_tags") -> None:
        self.tag_field_name = tag_field_name
        self.spec = ("word_tagger", {"tag_field_name": tag_field_name})
        self.stats = TaggingStats()
        self.closed = False

    def attach_cache(self, cache) -> None:
        self.cache = cache

    def setup(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def provenance(self) -> dict:
        return {"op": self.name, "tag_field_name": self.tag_field_name}

    def spent(self) -> float:
        return self.pricing.cost(self.stats.prompt_tokens, self.stats.completion_tokens)

    def process_rows(self, rows, *, base_dir=None):
        for row in rows:
            text = row.get("text", "")
            if text == "abort":
                raise RunAborted("told to stop")
            meta = row.setdefault(META_KEY, {})
            failed = text == "fail"
            meta[self.tag_field_name] = [[] if failed else text.split()]
            meta[self.tag_field_name + "_errors"] = ["HTTP 500: no" if failed else None]
            self.stats.add(rows=1, images=1, requests=1, prompt_tokens=10, completion_tokens=5)
            if failed:
                self.stats.add_failure("HTTP 500: no")
            else:
                self.stats.add(tagged=1)
        return rows


def write_rows(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def test_the_fake_operator_meets_the_interface():
    assert isinstance(WordTagger(), Operator)


def test_plan_one_file_or_one_part_per_shard(tmp_path):
    for name in ("a.jsonl", "b.parquet"):
        (tmp_path / name).write_text("")
    shards = open_dataset(str(tmp_path))
    one = plan(shards, str(tmp_path / "out" / "all.jsonl"))
    assert one.outputs == [str(tmp_path / "out" / "all.jsonl")] * 2
    assert one.targets == [(str(tmp_path / "out" / "all.jsonl"), [0, 1])]
    assert one.work_dir == str(tmp_path / "out") and one.stats_path == str(tmp_path / "out" / "all.jsonl.stats.json")
    parts = plan(shards, str(tmp_path / "parts") + "/", export_type="parquet", work_dir=str(tmp_path / "w"))
    assert parts.outputs == [str(tmp_path / "parts" / "a.parquet"), str(tmp_path / "parts" / "b.parquet")]
    assert parts.export_path == str(tmp_path / "parts") and parts.state_root == str(tmp_path / "w" / ".vlmtag")
    with pytest.raises(ConfigError, match="export_type='csv'"):
        plan(shards, str(tmp_path / "parts") + "/", export_type="csv")
    with pytest.raises(ConfigError, match="export_path: .*unsupported format"):
        plan(shards, str(tmp_path / "out.csv"))


def test_iter_batches_stops_at_the_limit_across_shards(tmp_path):
    write_rows(tmp_path / "a.jsonl", ["x"] * 3)
    write_rows(tmp_path / "b.jsonl", ["y"] * 3)
    shards = open_dataset(str(tmp_path))
    got = [(s, b, [r["text"] for r in rows]) for s, b, rows in iter_batches(shards, 2, limit=5)]
    assert got == [(0, 0, ["x", "x"]), (0, 1, ["x"]), (1, 0, ["y", "y"])]


def test_execute_checkpoints_each_batch_and_a_rerun_skips_them(tmp_path):
    src = write_rows(tmp_path / "in.jsonl", ["a b", "fail", "c", "abort", "d"])
    the_plan = plan(open_dataset(str(src)), str(tmp_path / "out.jsonl"))
    pipeline = Pipeline([WordTagger()])
    job = Job(the_plan.state_root, job_identity(the_plan, pipeline, mode="tag", limit=None))
    seen: list[RunStats] = []
    run = execute(pipeline, the_plan, job, LocalExecutor(depth=1), progress=seen.append)
    assert run.aborted == "told to stop" and not run.interrupted
    assert run.rows_done == 2 and [s.rows_processed for s in seen] == [2]  # batch 0 kept; batch 1 stopped
    assert job.is_done(0, 0) and not job.is_done(0, 1)
    stats = run.stats(pipeline)
    assert (stats.rows, stats.images_processed, stats.tagged, stats.failed) == (2, 3, 2, 1)
    assert stats.cost == pytest.approx(pipeline.cost()) and stats.failure_reasons == {"HTTP 500": 1}

    again = Job(the_plan.state_root, job_identity(the_plan, pipeline, mode="tag", limit=None))
    run = execute(Pipeline([WordTagger()]), the_plan, again, LocalExecutor(), limit=2)
    assert (run.rows_resumed, run.rows_done, run.aborted) == (2, 0, None)


def test_finalize_writes_the_export_and_stats_the_summary_and_report_read(tmp_path):
    src = write_rows(tmp_path / "in.jsonl", ["a b", "fail", "c"])
    the_plan = plan(open_dataset(str(src)), str(tmp_path / "out.jsonl"))
    pipeline = Pipeline([WordTagger()])
    job = Job(the_plan.state_root, job_identity(the_plan, pipeline, mode="tag", limit=None))
    run = execute(pipeline, the_plan, job, LocalExecutor())
    stats = finalize(the_plan, job, pipeline, run.stats(pipeline), dataset_label="in.jsonl", started=0.0)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert [r[META_KEY]["image_tags"] for r in rows] == [[["a", "b"]], [[]], [["c"]]]
    on_disk = RunStats.read(the_plan.stats_path)
    assert on_disk.to_dict() == stats.to_dict()
    assert (on_disk.rows, on_disk.images, on_disk.tagged, on_disk.failed, on_disk.rows_written) == (3, 3, 2, 1, 3)
    assert on_disk.completed and on_disk.dataset_path == "in.jsonl" and on_disk.images_root == str(tmp_path)
    assert on_disk.provenance["ops"] == [{"op": "word_tagger", "tag_field_name": "image_tags"}]
    assert on_disk.cost == pytest.approx(3 * (10 * 1.0 + 5 * 2.0) / 1e6)
    assert job.completed() is not None and not any(Path(job.chunk_dir).glob("*"))


def test_two_operators_are_counted_per_tag_field(tmp_path):
    src = write_rows(tmp_path / "in.jsonl", ["a", "fail"])
    result = run_job(Pipeline([WordTagger("first"), WordTagger("second")]), open_dataset(str(src)),
                     str(tmp_path / "out.jsonl"), use_cache=False)
    s = result.stats
    assert (s.rows, s.images, s.tagged, s.failed, s.requests) == (2, 4, 2, 2, 4)
    assert [op["tag_field_name"] for op in s.provenance["ops"]] == ["first", "second"]


def test_stats_round_trip_and_a_hand_edited_file_is_read_safely(tmp_path):
    stats = RunStats(rows=3, images=4, cost=0.25, wall_seconds=2.0, images_processed=4, parts=[{"output": "o"}])
    path = tmp_path / "s.json"
    stats.write(str(path))
    doc = json.loads(path.read_text())
    assert doc["images_per_second"] == 2.0 and doc["cost"] == 0.25
    assert RunStats.read(str(path)) == stats
    odd = RunStats.from_dict({"rows": "many", "failed": True, "cost": None, "images_root": None, "other": 1,
                              "wall_seconds": 1})
    assert (odd.rows, odd.failed, odd.cost, odd.wall_seconds) == (0, 0, None, 1)
    assert "cost" not in RunStats().to_dict()  # no prices, no cost


def test_already_tagged_rows_reach_the_stats_and_the_report(tmp_path, photo_dir):
    """What the real run writes is what the report reads: 'N already tagged' shows (it once never could)."""
    rows = [{"images": [str(photo_dir / "coffee.jpg")], "__dj__meta__": {"image_tags": [["kept"]]}},
            {"images": [str(photo_dir / "chelsea.jpg")], "__dj__meta__": {"image_tags": [["kept"]]}},
            {"images": [str(photo_dir / "coffee.jpg")]}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"dataset_path": str(src), "export_path": str(out), "process": [
        {"image_tagging_vlm_mapper": {"api_or_hf_model": "builtin:default"}}]}))
    assert main(["-q", "run", "--config", str(recipe)]) == 0
    stats = RunStats.read(f"{out}.stats.json")
    assert (stats.rows_already_tagged, stats.images_processed, stats.rows) == (2, 1, 3)
    page = Path(write_report(str(out), str(tmp_path / "r.html")).path).read_text()
    assert "2 already tagged" in page
