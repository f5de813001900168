"""Recipes and the CLI as a user drives them: the demo, Data-Juicer's own dataset, bad recipes, formats."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import DEMO_DATASET
from vlmtag.cli import main

ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_recipe(tmp_path, **keys) -> Path:
    recipe = {"process": [{"image_tagging_vlm_mapper": {"api_or_hf_model": "builtin:default"}}], **keys}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_demo_recipe_runs_as_make_demo_does(tmp_path):
    out = tmp_path / "demo.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "vlmtag", "run", "--config", "examples/demo.yaml", "--set", f"export_path={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and f"{out}.stats.json" in proc.stdout
    assert "XNNPACK" not in proc.stderr  # LiteRT's start-up banner is not passed on
    rows_in = read_jsonl(ROOT / "examples/demo.jsonl")
    rows_out = read_jsonl(out)
    assert len(rows_out) == len(rows_in)
    for a, b in zip(rows_in, rows_out):
        assert {k: v for k, v in b.items() if k != "__dj__meta__"} == a  # every input field unchanged
        meta = b["__dj__meta__"]
        assert len(meta["image_tags"]) == max(1, len(a["images"])) == len(meta["image_tags_errors"])
    by_image = {r["images"][0]: r["__dj__meta__"]["image_tags"][0] for r in rows_out if len(r["images"]) == 1}
    assert "person" in by_image["images/astronaut.jpg"]
    assert {"cup", "espresso"} <= set(by_image["images/coffee.jpg"])
    assert "cat" in by_image["images/chelsea.jpg"]
    two = rows_out[5]["__dj__meta__"]["image_tags"]
    assert two[0] == by_image["images/chelsea.jpg"] and two[1] == by_image["images/coffee.jpg"]
    twice = rows_out[6]["__dj__meta__"]["image_tags"]
    assert twice[0] == twice[1] == by_image["images/rocket.jpg"]
    assert rows_out[7]["__dj__meta__"] == {"image_tags": [[]], "image_tags_errors": [None]}
    stats = json.loads(Path(f"{out}.stats.json").read_text())
    assert stats["rows"] == 8 and stats["images"] == 9 and stats["tagged"] == 9 and stats["failed"] == 0
    # and the shipped labelled set scores it: the embedded tagger finds person, cup, espresso and cat
    scores = tmp_path / "scores.json"
    assert main(["-q", "eval", "--pred", str(out), "--gold", str(ROOT / "examples/gold.jsonl"),
                 "--json", str(scores)]) == 0
    result = json.loads(scores.read_text())
    hits = {row["tag"] for row in result["per_tag"] if row["tp"] > 0}
    assert {"person", "cup", "espresso", "cat"} <= hits
    assert 0 < result["micro"]["precision"] < 1


@pytest.mark.skipif(not DEMO_DATASET.is_dir(), reason=f"Data-Juicer's demo dataset is not at {DEMO_DATASET}")
def test_data_juicer_demo_dataset_runs_unchanged(tmp_path):
    data = tmp_path / "dj"
    shutil.copytree(DEMO_DATASET, data)
    recipe = write_recipe(tmp_path, project_name="dj-demo", dataset_path=str(data / "demo-dataset-images.jsonl"),
                          export_path=str(tmp_path / "out.jsonl"), np=4, text_keys="text", open_tracer=False)
    assert main(["-q", "run", "--config", str(recipe)]) == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["images"] for r in rows] == [["images/img1.png"], ["images/img2.jpg"], ["images/img3.jpg"]]
    for r in rows:
        assert r["__dj__meta__"]["image_tags_errors"] == [None]
        assert r["__dj__meta__"]["image_tags"][0]
    assert "bus" in rows[1]["__dj__meta__"]["image_tags"][0]
    assert "umbrella" in rows[2]["__dj__meta__"]["image_tags"][0]


@pytest.mark.parametrize("ext", [".json", ".parquet"])
def test_json_and_parquet_round_trip(tmp_path, photo_dir, ext):
    src = tmp_path / "in.jsonl"
    rows = [{"images": [str(photo_dir / "coffee.jpg")], "text": "coffee", "id": 1},
            {"images": [], "text": "none", "id": 2},
            {"images": [str(photo_dir / "missing.jpg")], "text": "gone", "id": 3}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mid = tmp_path / f"mid{ext}"
    assert main(["-q", "run", "--config", str(write_recipe(tmp_path, dataset_path=str(src), export_path=str(mid)))]) == 0
    # and back: the export is itself a valid input, already tagged rows are left untouched
    out = tmp_path / "out.jsonl"
    assert main(["-q", "run", "--config", str(write_recipe(tmp_path, dataset_path=str(mid), export_path=str(out)))]) == 0
    got = read_jsonl(out)
    assert [r["id"] for r in got] == [1, 2, 3]
    assert "cup" in got[0]["__dj__meta__"]["image_tags"][0]
    assert got[1]["__dj__meta__"]["image_tags"] == [[]]
    assert got[2]["__dj__meta__"]["image_tags"] == [[]]
    assert got[2]["__dj__meta__"]["image_tags_errors"][0].startswith("file not found")
    stats = json.loads(Path(f"{out}.stats.json").read_text())
    assert stats["rows_already_tagged"] == 3 and stats["images_processed"] == 0
    assert stats["rows"] == 3 and stats["images"] == 2 and stats["tagged"] == 1 and stats["failed"] == 1
    if ext == ".parquet":
        assert pq.read_table(mid).num_rows == 3


def test_set_and_limit(tmp_path, photo_dir):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"images": [str(photo_dir / f"{n}.jpg")]}) + "\n"
                           for n in ("coffee", "chelsea", "rocket")))
    recipe = write_recipe(tmp_path, dataset_path=str(src), export_path=str(tmp_path / "x.jsonl"))
    out = tmp_path / "limited.jsonl"
    assert main(["-q", "run", "--config", str(recipe), "--limit", "2", "--set", f"export_path={out}",
                 "--set", "op.tag_field_name=labels", "--set", "op.max_tags=1"]) == 0
    got = read_jsonl(out)
    assert len(got) == 2
    assert all(len(r["__dj__meta__"]["labels"][0]) == 1 for r in got)
    assert "labels_errors" in got[0]["__dj__meta__"]


BAD = [
    ({"process": [{"image_tagging_vlm_mapper": {"concurrency": "many"}}]}, "concurrency='many'"),
    ({"process": [{"image_tagging_vlm_mapper": {"concurency": 3}}]}, "did you mean 'concurrency'"),
    ({"process": [{"image_captioning_mapper": {}}]}, "'image_captioning_mapper' is not available"),
    ({"process": []}, "process"),
    ({"np": 0}, "np=0"),
    ({"export_path": "out.csv"}, "unsupported format '.csv'"),
    ({"process": [{"image_tagging_vlm_mapper": {"api_or_hf_model": "builtin:nope"}}]}, "builtin:nope"),
    ({"process": [{"image_tagging_vlm_mapper": {"is_api_model": True, "model_params": {"api_key": "${VLMTAG_TEST_UNSET_VAR}"}}}]},
     "VLMTAG_TEST_UNSET_VAR is not set"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_recipe_fails_fast_with_one_line(tmp_path, capsys, photo_dir, change, message):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"images": [str(photo_dir / "coffee.jpg")]}) + "\n")
    recipe = {"dataset_path": str(src), "export_path": str(tmp_path / "out.jsonl"),
              "process": [{"image_tagging_vlm_mapper": {"api_or_hf_model": "builtin:default"}}]}
    recipe.update(change)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    os.environ.pop("VLMTAG_TEST_UNSET_VAR", None)
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert message in err
    assert not (tmp_path / "out.jsonl").exists()


def test_unknown_top_level_keys_warn_but_run(tmp_path, photo_dir, caplog):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"images": [str(photo_dir / "coffee.jpg")]}) + "\n")
    recipe = write_recipe(tmp_path, dataset_path=str(src), export_path=str(tmp_path / "o.jsonl"),
                          use_checkpoint=True, my_own_key=1)
    assert main(["run", "--config", str(recipe)]) == 0
    assert "use_checkpoint" in caplog.text and "my_own_key" in caplog.text


def test_env_vars_expand_in_recipe_values(tmp_path, photo_dir, monkeypatch):
    monkeypatch.setenv("VLMTAG_TEST_OUT", str(tmp_path / "from-env.jsonl"))
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"images": [str(photo_dir / "coffee.jpg")]}) + "\n")
    recipe = write_recipe(tmp_path, dataset_path=str(src), export_path="${VLMTAG_TEST_OUT}")
    assert main(["-q", "run", "--config", str(recipe)]) == 0
    assert (tmp_path / "from-env.jsonl").exists()


def test_quick_tag_command_over_a_folder(tmp_path, photo_dir):
    out = tmp_path / "quick.jsonl"
    assert main(["-q", "tag", str(photo_dir), "-o", str(out)]) == 0
    rows = read_jsonl(out)
    assert [Path(r["images"][0]).name for r in rows] == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    assert all(r["__dj__meta__"]["image_tags"][0] for r in rows)


def test_quick_tag_missing_path_is_a_clear_error(tmp_path, capsys):
    assert main(["tag", str(tmp_path / "nope"), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_a_corrupt_tar_is_not_the_end_of_the_job(tmp_path, photo_dir, capsys, caplog):
    """The whole samples before the damage are tagged, the damage is one unreadable row, the run completes with
    a warning naming the shard, and a rerun does not loop on it."""
    import tarfile

    tar_path = tmp_path / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, name in enumerate(["coffee", "chelsea", "rocket"]):
            tar.add(photo_dir / f"{name}.jpg", arcname=f"{i:09d}.jpg")
    data = tar_path.read_bytes()
    tar_path.write_bytes(data[: len(data) * 2 // 3])  # cut inside the last sample
    recipe = write_recipe(tmp_path, dataset_path=str(tar_path), export_path=str(tmp_path / "out.jsonl"))
    assert main(["run", "--config", str(recipe), "--set", "op.batch_size=1"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "damaged shard" in caplog.text and "00000.tar" in caplog.text  # the warning line
    assert "unreadable rows: 1 (first at 00000.tar: " in captured.out
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["images"] for r in rows[:2]] == [["00000.tar#000000000.jpg"], ["00000.tar#000000001.jpg"]]
    assert all(r["__dj__meta__"]["image_tags"][0] for r in rows[:2])
    assert "__vlmtag_invalid_row__" in rows[2] and "truncated" in rows[2]["__vlmtag_invalid_row__"]["error"]
    stats = json.loads((tmp_path / "out.jsonl.stats.json").read_text())
    assert stats["unreadable_rows"] == 1 and "000000002.jpg" in stats["first_unreadable"]
    assert main(["run", "--config", str(recipe), "--set", "op.batch_size=1"]) == 0
    assert "already complete" in capsys.readouterr().out


def test_progress_goes_to_the_log_when_not_on_a_terminal(tmp_path, photo_dir, capsys, monkeypatch):
    import vlmtag.progress

    monkeypatch.setattr(vlmtag.progress, "LOG_EVERY_S", 0.0)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"images": [str(photo_dir / f"{n}.jpg")]}) + "\n" for n in ("coffee", "chelsea")))
    recipe = write_recipe(tmp_path, dataset_path=str(src), export_path=str(tmp_path / "o.jsonl"))
    assert main(["run", "--config", str(recipe), "--set", "op.batch_size=1"]) == 0
    err = capsys.readouterr().err
    assert "vlmtag: progress: rows 1/2" in err and "vlmtag: progress: rows 2/2" in err
    assert main(["-q", "run", "--config", str(recipe), "--set", f"export_path={tmp_path / 'q.jsonl'}"]) == 0
    assert "progress" not in capsys.readouterr().err


def test_a_missing_relative_dataset_path_says_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, dataset_path="data/rows.jsonl", export_path="out.jsonl")
    assert main(["run", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"vlmtag: error: recipe: dataset_path: data/rows.jsonl: no such file or folder (looked for "
                   f"{tmp_path / 'data' / 'rows.jsonl'}: relative paths start at the current folder)")


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_works_before_or_after_the_subcommand(tmp_path, photo_dir, capsys, where):
    out = tmp_path / "o.jsonl"
    args = ["tag", str(photo_dir), "-o", str(out)]
    assert main(["-q", *args] if where == "before" else [*args, "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert len(read_jsonl(out)) == 4
    assert main(args) == 0  # without it, the rerun says what it found
    assert "already complete" in capsys.readouterr().out
