"""Where the work runs: `np` processes and Ray Data give the export one process gives, and share its cache.

Ray starts slowly on a small machine, so this module starts it once (`ray.init(num_cpus=2)`) and keeps the
number of Ray runs small; each Ray test checks several things a user would check after one run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from openai_server import OpenAIServer, Reply, say, user_text
from vlmtag.cli import main
from vlmtag.executors import WorkItem
from vlmtag.ops import RunAborted, get_operator
from vlmtag.ops.base import Pipeline

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def read_stats(export) -> dict:
    return json.loads(Path(f"{export}.stats.json").read_text())


def write_api_dataset(tmp_path: Path, n: int) -> Path:
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    lines = []
    for i in range(n):
        Image.new("RGB", (16, 16), (i, 40, 7)).save(tmp_path / "imgs" / f"{i:03d}.png")
        lines.append(json.dumps({"id": i, "images": [f"imgs/{i:03d}.png"], "text": f"say: t{i} x{i % 3}"}))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


def write_photo_dataset(tmp_path: Path, photo_dir: Path) -> Path:
    """8 rows, each photo twice, some rows with two images: relative paths, resolved against the dataset."""
    rows = []
    for i in range(8):
        names = [PHOTOS[i % 4]] + ([PHOTOS[(i + 1) % 4]] if i % 3 == 0 else [])
        rows.append({"id": i, "images": [str(photo_dir / f"{n}.jpg") for n in names], "text": f"photo {i}"})
    data = tmp_path / "photos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def write_recipe(tmp_path: Path, data: Path, name: str = "recipe.yaml", **op) -> Path:
    recipe = tmp_path / name
    recipe.write_text(yaml.safe_dump({"dataset_path": str(data), "export_path": str(tmp_path / "out" / "local.jsonl"),
                                      "process": [{"image_tagging_vlm_mapper": op}]}))
    return recipe


def api_op(server: OpenAIServer, **kw) -> dict:
    return {"api_or_hf_model": "test-model", "is_api_model": True, "batch_size": 4, "concurrency": 4,
            "retry_backoff": 0.01, "model_params": {"base_url": server.base_url, "api_key": "k"}, **kw}


EMBEDDED = {"api_or_hf_model": "builtin:default", "batch_size": 2}


def run(recipe: Path, export: Path, *sets: str) -> None:
    args = ["-q", "run", "--config", str(recipe), "--set", f"export_path={export}"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0


@pytest.fixture
def server():
    with OpenAIServer(decode=False) as s:
        s.behaviour = say
        yield s


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    # A stalled pipeline fails the test in minutes instead of Ray Data's default 30 minutes.
    ctx = ray.data.DataContext.get_current()
    saved, ctx.execution_no_progress_timeout_s = getattr(ctx, "execution_no_progress_timeout_s", None), 180
    yield ray
    ctx.execution_no_progress_timeout_s = saved
    ray.shutdown()


def items_of(n_items: int, rows_per_item: int, folder: Path):
    """Work items as the job layer makes them: batches of rows and the folder their images live in."""
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for b in range(n_items):
        rows = []
        for j in range(rows_per_item):
            i = b * rows_per_item + j
            Image.new("RGB", (8, 8), (i, 1, 2)).save(folder / f"{i}.png")
            rows.append({"id": i, "images": [f"{i}.png"], "text": f"say: t{i}"})
        yield WorkItem((0, b), rows, str(folder))


def interrupted_after_the_first():
    """A `done` that records (batch, tags) and raises KeyboardInterrupt (Ctrl-C) after the first batch."""
    finished = []

    def done(item, rows):
        finished.append((item.key[1], [r["__dj__meta__"]["image_tags"] for r in rows]))
        if len(finished) == 1:
            raise KeyboardInterrupt

    return finished, done


# -- np processes ------------------------------------------------------------------------------------------------


def test_np_2_processes_give_the_same_export_and_stats_as_one(tmp_path, photo_dir):
    data = write_photo_dataset(tmp_path, photo_dir)
    recipe = write_recipe(tmp_path, data, **EMBEDDED)
    one, two = tmp_path / "out" / "np1.jsonl", tmp_path / "out" / "np2.jsonl"
    run(recipe, one, "use_cache=false")
    run(recipe, two, "use_cache=false", "np=2")
    rows = read_jsonl(two)
    assert rows == read_jsonl(one)
    assert [r["id"] for r in rows] == list(range(8))
    assert "cup" in rows[1]["__dj__meta__"]["image_tags"][0]  # coffee
    s1, s2 = read_stats(one), read_stats(two)
    for key in ("rows", "images", "tagged", "failed", "requests", "rows_processed", "images_processed"):
        assert s2[key] == s1[key], key
    assert (s2["rows"], s2["images"], s2["tagged"]) == (8, 11, 11)


def test_a_worker_process_error_reaches_the_run_as_the_same_exception(tmp_path, server):
    from vlmtag.executors.processes import ProcessExecutor

    server.behaviour = lambda body, attempt: Reply.unauthorized("key revoked")
    op = get_operator("image_tagging_vlm_mapper")(**api_op(server, try_num=1))
    finished = []
    with pytest.raises(RunAborted, match="in a row failed with the same error"):
        ProcessExecutor(workers=2).run(Pipeline([op]), items_of(6, 4, tmp_path / "imgs"),
                                       lambda item, rows: finished.append(item.key))
    assert finished == []
    assert op.stats.requests >= 3  # what the workers sent is counted in the driver's summary


def test_ctrl_c_in_np_processes_finishes_the_batches_in_flight(tmp_path, server):
    from vlmtag.executors.processes import ProcessExecutor

    op = get_operator("image_tagging_vlm_mapper")(**api_op(server))
    finished, done = interrupted_after_the_first()

    with pytest.raises(KeyboardInterrupt):
        ProcessExecutor(workers=2).run(Pipeline([op]), items_of(8, 2, tmp_path / "imgs"), done)  # 4 batches in flight
    assert [b for b, _ in finished] == [0, 1, 2, 3]
    assert finished[3][1] == [[["t6"]], [["t7"]]]
    assert server.count == 8


# -- Ray ---------------------------------------------------------------------------------------------------------


def test_ray_api_run_has_exact_tags_reuses_the_local_cache_and_matches_a_local_export(tmp_path, server, ray_cluster):
    data = write_api_dataset(tmp_path, 20)
    recipe = write_recipe(tmp_path, data, **api_op(server))
    out = tmp_path / "out"
    assert main(["-q", "run", "--config", str(recipe), "--set", f"export_path={out / 'first12.jsonl'}",
                 "--limit", "12"]) == 0
    assert server.count == 12

    run(recipe, out / "ray.jsonl", "executor_type=ray", "np=2")
    assert server.count == 20  # the 12 answers cached by the local run cost nothing
    rows = read_jsonl(out / "ray.jsonl")
    assert [r["id"] for r in rows] == list(range(20))
    for r in rows:
        i = r["id"]
        assert r["__dj__meta__"] == {"image_tags": [[f"t{i}", f"x{i % 3}"]], "image_tags_errors": [None]}
    stats = read_stats(out / "ray.jsonl")
    assert (stats["rows"], stats["tagged"], stats["cached"], stats["requests"]) == (20, 20, 12, 8)

    run(recipe, out / "local.jsonl")  # all from the cache now
    assert server.count == 20
    assert read_jsonl(out / "local.jsonl") == rows
    assert read_jsonl(out / "first12.jsonl") == rows[:12]


def test_ray_embedded_model_gives_the_local_export(tmp_path, photo_dir, ray_cluster):
    data = write_photo_dataset(tmp_path, photo_dir)
    recipe = write_recipe(tmp_path, data, **EMBEDDED)
    local, on_ray = tmp_path / "out" / "local.jsonl", tmp_path / "out" / "ray.jsonl"
    run(recipe, local, "use_cache=false")
    run(recipe, on_ray, "use_cache=false", "executor_type=ray", "np=2")
    rows = read_jsonl(on_ray)
    assert rows == read_jsonl(local)
    assert "cup" in rows[1]["__dj__meta__"]["image_tags"][0]
    s_local, s_ray = read_stats(local), read_stats(on_ray)
    for key in ("rows", "images", "tagged", "failed", "requests"):
        assert s_ray[key] == s_local[key], key


def test_ray_results_out_of_order_with_a_slow_first_item_all_arrive_in_order(tmp_path, server, ray_cluster):
    """The first item finishes last: the driver must keep the pipeline moving instead of waiting on it (this
    order once stalled the pipeline until Ray Data's no-progress timeout)."""
    from vlmtag.executors.ray import RayExecutor

    server.behaviour = lambda body, attempt: Reply.slow(2.0, say(body, attempt)) if "say: t0" in user_text(
        body) else say(body, attempt)
    op = get_operator("image_tagging_vlm_mapper")(**api_op(server))
    finished = []
    RayExecutor(np=2).run(Pipeline([op]), items_of(6, 1, tmp_path / "a"), lambda item, rows: finished.append(
        (item.key[1], rows[0]["__dj__meta__"]["image_tags"])))
    assert finished == [(b, [[f"t{b}"]]) for b in range(6)]
    assert server.count == 6


def test_a_ray_api_actor_runs_the_next_item_while_the_last_requests_of_one_are_out(tmp_path, server, ray_cluster):
    """One actor with two connections (concurrency 2), items of one image: the server only sees two requests at
    once if the actor runs two items side by side, as the local executor does."""
    from vlmtag.executors.ray import RayExecutor

    server.behaviour = lambda body, attempt: Reply.slow(0.5, say(body, attempt))
    op = get_operator("image_tagging_vlm_mapper")(**api_op(server, concurrency=2))
    finished = []
    RayExecutor(np=1).run(Pipeline([op]), items_of(6, 1, tmp_path / "a"), lambda item, rows: finished.append(
        rows[0]["__dj__meta__"]["image_tags"]))
    assert finished == [[[f"t{b}"]] for b in range(6)]
    assert server.max_in_flight == 2
    assert op.stats.requests == server.count == 6 and op.stats.tagged == 6


def test_ray_actor_error_and_ctrl_c(tmp_path, server, ray_cluster):
    """An operator error in an actor is raised in the driver as itself; Ctrl-C finishes what was sent."""
    from vlmtag.executors.ray import RayExecutor

    op = get_operator("image_tagging_vlm_mapper")(**api_op(server))
    finished, done = interrupted_after_the_first()

    with pytest.raises(KeyboardInterrupt):
        RayExecutor(np=2).run(Pipeline([op]), items_of(12, 2, tmp_path / "a"), done)  # 2 actors, up to 6 items in Ray
    # Everything sent was finished, in order: at least the 4 that two actors run at once, never all 12.
    n = len(finished)
    assert 4 <= n < 12 and [b for b, _ in finished] == list(range(n))
    assert finished[-1][1] == [[[f"t{2 * n - 2}"]], [[f"t{2 * n - 1}"]]]
    assert op.stats.requests == server.count == 2 * n

    server.behaviour = lambda body, attempt: Reply.unauthorized("key revoked")
    op = get_operator("image_tagging_vlm_mapper")(**api_op(server, try_num=1))
    with pytest.raises(RunAborted, match="in a row failed with the same error"):
        RayExecutor(np=2).run(Pipeline([op]), items_of(6, 4, tmp_path / "b"), lambda item, rows: None)


def test_executor_type_ray_without_ray_installed_is_one_clear_line(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    recipe = write_recipe(tmp_path, write_api_dataset(tmp_path, 2), **api_op(server))
    assert main(["run", "--config", str(recipe), "--set", "executor_type=ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vlmtag: error: executor_type: ray needs Ray, which is not installed: pip install 'vlmtag[ray]'"
    assert server.count == 0


def test_ray_pool_size_and_resources_follow_data_juicer(server):
    from vlmtag.executors.ray import actor_resources, pool_size

    make = get_operator("image_tagging_vlm_mapper")
    api = make(**api_op(server))
    assert pool_size([api], np=3) == 3  # the recipe's np
    assert pool_size([make(**api_op(server, num_proc=5))], np=3) == 5  # the op's num_proc wins
    assert actor_resources([api], cluster_gpus=8) == {"num_cpus": 1.0, "num_gpus": 0.0}  # API: no GPU
    hf = make("Qwen/Qwen2.5-VL-7B-Instruct", engine="hf")
    assert actor_resources([hf], cluster_gpus=0)["num_gpus"] == 0  # no GPU in the cluster
    assert actor_resources([hf], cluster_gpus=8)["num_gpus"] == 1
    tp2 = make("Qwen/Qwen2.5-VL-7B-Instruct", engine="vllm", model_params={"tensor_parallel_size": 2})
    assert actor_resources([tp2], cluster_gpus=8)["num_gpus"] == 2
    assert actor_resources([make("m", engine="hf", num_gpus=0.5, num_cpus=2)], cluster_gpus=8) == {
        "num_cpus": 2.0, "num_gpus": 0.5}
    assert actor_resources([make("m", engine="hf", accelerator="cpu")], cluster_gpus=8)["num_gpus"] == 0


def test_ray_client_address_is_refused_with_what_to_do_instead(tmp_path, server, capsys):
    pytest.importorskip("ray")
    recipe = write_recipe(tmp_path, write_api_dataset(tmp_path, 2), **api_op(server))
    assert main(["run", "--config", str(recipe), "--set", "executor_type=ray",
                 "--set", "ray_address=ray://head:10001"]) == 2
    err = capsys.readouterr().err
    assert "Ray Data does not run through Ray Client" in err and "ray_address: auto" in err
    assert server.count == 0
