"""Crash-safe resume and the answer cache, as a user meets them: kill the run, rerun it, pay nothing twice."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from openai_server import OpenAIServer, Reply, say, user_text
from vlmtag.cli import main

ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def make_images(folder: Path, n: int) -> list[str]:
    """n distinct small PNGs (distinct bytes, so the cache cannot merge them)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img{i:05d}.png"
        Image.new("RGB", (16, 16), (i % 256, (i // 256) % 256, 7)).save(folder / name)
        names.append(f"imgs/{name}")
    return names


def write_dataset(tmp_path: Path, n: int) -> Path:
    names = make_images(tmp_path / "imgs", n)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": i, "images": [name], "text": f"say: t{i} x{i % 3}"}) + "\n"
                            for i, name in enumerate(names)))
    return data


def write_recipe(tmp_path: Path, server: OpenAIServer, data: Path, **op) -> Path:
    args = {"api_or_hf_model": "test-model", "is_api_model": True, "batch_size": 8, "concurrency": 4,
            "retry_backoff": 0.01, "model_params": {"base_url": server.base_url, "api_key": "k"}, **op}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"dataset_path": str(data), "export_path": str(tmp_path / "out" / "tagged.jsonl"),
                                      "process": [{"image_tagging_vlm_mapper": args}]}))
    return recipe


def check_export(path: Path, n: int) -> None:
    rows = read_jsonl(path)
    assert [r["id"] for r in rows] == list(range(n))  # every row once, in order
    for r in rows:
        i = r["id"]
        assert r["__dj__meta__"] == {"image_tags": [[f"t{i}", f"x{i % 3}"]], "image_tags_errors": [None]}


@pytest.fixture
def server():
    with OpenAIServer(decode=False) as s:
        s.behaviour = say
        yield s


def test_second_run_of_a_finished_job_does_nothing(tmp_path, server, capsys):
    data = write_dataset(tmp_path, 20)
    recipe = write_recipe(tmp_path, server, data)
    assert main(["run", "--config", str(recipe)]) == 0
    assert server.count == 20
    check_export(tmp_path / "out" / "tagged.jsonl", 20)
    capsys.readouterr()
    assert main(["run", "--config", str(recipe)]) == 0
    assert server.count == 20
    assert "already complete" in capsys.readouterr().out


def test_cache_hits_cost_no_request_and_a_prompt_change_misses(tmp_path, server):
    data = write_dataset(tmp_path, 12)
    recipe = write_recipe(tmp_path, server, data)
    assert main(["-q", "run", "--config", str(recipe)]) == 0
    assert server.count == 12
    # a new export (a new job) with the same prompts: every answer comes from the cache
    out2 = tmp_path / "out" / "again.jsonl"
    assert main(["-q", "run", "--config", str(recipe), "--set", f"export_path={out2}"]) == 0
    assert server.count == 12
    check_export(out2, 12)
    stats = json.loads(Path(f"{out2}.stats.json").read_text())
    assert stats["cached"] == 12 and stats["requests"] == 0
    # max_tags is applied to cached answers again: no request, fewer tags
    out3 = tmp_path / "out" / "one-tag.jsonl"
    assert main(["-q", "run", "--config", str(recipe), "--set", f"export_path={out3}", "--set", "op.max_tags=1"]) == 0
    assert server.count == 12
    assert all(len(r["__dj__meta__"]["image_tags"][0]) == 1 for r in read_jsonl(out3))
    # a different system prompt changes the answer: every image is asked again
    out4 = tmp_path / "out" / "new-prompt.jsonl"
    assert main(["-q", "run", "--config", str(recipe), "--set", f"export_path={out4}",
                 "--set", "op.system_prompt=Tag it. Answer {\"tags\": [...]}"]) == 0
    assert server.count == 24
    # --no-cache asks again even for known answers
    out5 = tmp_path / "out" / "no-cache.jsonl"
    assert main(["-q", "run", "--config", str(recipe), "--set", f"export_path={out5}", "--no-cache"]) == 0
    assert server.count == 36


def refusing(failing: set[str], message: str):
    """A `behaviour`: HTTP 400 for the images whose first word after `say:` is in `failing` (read at each
    request, so a test can clear it), `say` for the others."""

    def behaviour(body, attempt):
        word = user_text(body).split("say:", 1)[1].split()[0]
        return Reply.error(400, message) if word in failing else say(body, attempt)

    return behaviour


def test_only_successes_are_cached_and_retry_failed_retries_only_failures(tmp_path, server):
    data = write_dataset(tmp_path, 10)
    failing = {"t3", "t7"}
    server.behaviour = refusing(failing, "temporarily refused")
    recipe = write_recipe(tmp_path, server, data)
    assert main(["-q", "run", "--config", str(recipe)]) == 0
    out = tmp_path / "out" / "tagged.jsonl"
    rows = read_jsonl(out)
    assert [i for i, r in enumerate(rows) if r["__dj__meta__"]["image_tags_errors"][0]] == [3, 7]
    assert server.count == 10
    failing.clear()
    assert main(["-q", "run", "--config", str(recipe), "--retry-failed"]) == 0
    assert server.count == 12  # only the two failed images were asked again
    check_export(out, 10)


def test_rerunning_a_job_that_had_failures_retries_only_them(tmp_path, server):
    data = write_dataset(tmp_path, 10)
    failing = {"t2", "t5", "t8"}
    server.behaviour = refusing(failing, "refused for now")
    recipe = write_recipe(tmp_path, server, data)
    assert main(["-q", "run", "--config", str(recipe)]) == 0
    assert server.count == 10
    failing.clear()
    assert main(["-q", "run", "--config", str(recipe)]) == 0  # the same command again
    assert server.count == 13  # the three failures, nothing else
    check_export(tmp_path / "out" / "tagged.jsonl", 10)
    assert main(["-q", "run", "--config", str(recipe)]) == 0  # now without failures: nothing to do
    assert server.count == 13


def test_abort_keeps_finished_batches_and_a_rerun_resumes(tmp_path, server, capsys):
    data = write_dataset(tmp_path, 40)
    state = {"n": 0, "broken": True}

    def breaks_after_16(body, attempt):
        state["n"] += 1
        if state["broken"] and state["n"] > 16:
            return Reply.unauthorized("key revoked")
        return say(body, attempt)

    server.behaviour = breaks_after_16
    recipe = write_recipe(tmp_path, server, data, concurrency=2)
    assert main(["run", "--config", str(recipe), "--set", "op.try_num=2"]) == 1
    out = capsys.readouterr().out
    assert "run aborted" in out and "run the same command again" in out
    assert f"  vlmtag run --config {recipe} --set op.try_num=2\n" in out  # the whole command, to copy
    assert not (tmp_path / "out" / "tagged.jsonl").exists()
    first = server.count
    state["broken"] = False
    assert main(["-q", "run", "--config", str(recipe), "--set", "op.try_num=2"]) == 0
    check_export(tmp_path / "out" / "tagged.jsonl", 40)
    # finished batches are not asked again; good answers of the failed batch come from the cache
    assert server.count - first <= 40 - 16


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_a_random_moment_then_rerun(tmp_path, seed):
    """SIGKILL a real run in a subprocess, rerun the same command: every row once, in order, exact tags,
    and no more requests than images plus those in flight at the kill."""
    n, concurrency, batch_size = 120, 4, 8
    data = write_dataset(tmp_path, n)
    with OpenAIServer(decode=False, latency=0.01) as server:
        server.behaviour = say
        recipe = write_recipe(tmp_path, server, data, concurrency=concurrency, batch_size=batch_size)
        cmd = [sys.executable, "-m", "vlmtag", "-q", "run", "--config", str(recipe)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        target = random.Random(seed).randint(5, n - 10)
        deadline = time.monotonic() + 120
        while server.count < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = server.count
        assert not (tmp_path / "out" / "tagged.jsonl").exists() or proc.returncode == 0
        rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        check_export(tmp_path / "out" / "tagged.jsonl", n)
        # answers are cached as they arrive, so only the requests in flight at the kill are sent again
        assert server.count <= n + concurrency, (killed_at, server.count)


def test_an_aborted_quick_tag_run_prints_its_whole_command_to_resume(tmp_path, server, capsys):
    server.behaviour = lambda body, attempt: Reply.unauthorized("key revoked")
    make_images(tmp_path / "imgs", 30)
    out = tmp_path / "tags.jsonl"
    args = ["tag", str(tmp_path / "imgs"), "-o", str(out), "--api-base", server.base_url, "--model", "m",
            "--concurrency", "4"]
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "run aborted" in printed
    assert ("  vlmtag tag " + str(tmp_path / "imgs") + f" -o {out} --api-base {server.base_url} --model m "
            "--concurrency 4\n") in printed
