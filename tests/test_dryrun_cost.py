"""Dry runs, cost estimates and the max_cost guard, as a user paying per token sees them."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from PIL import Image

from openai_server import OpenAIServer, Reply
from vlmtag.cli import main

PRICES = {"price_per_million_input_tokens": 1000.0, "price_per_million_output_tokens": 2000.0}


def recipe_for(tmp_path: Path, server: OpenAIServer, rows: list[dict], **op) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = {"api_or_hf_model": "m", "is_api_model": True, "model_params": {"base_url": server.base_url},
            "batch_size": 4, "concurrency": 2, **op}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"dataset_path": str(data), "export_path": str(tmp_path / "out.jsonl"),
                                    "process": [{"image_tagging_vlm_mapper": args}]}))
    return path


def test_dry_run_counts_checks_and_estimates_without_a_request(tmp_path, photo_dir, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    Image.new("RGB", (56, 28)).save(tmp_path / "small.png")
    rows = [{"images": [str(photo_dir / "coffee.jpg"), "small.png"], "text": "a"},
            {"images": ["broken.jpg", "missing.jpg"]},
            {"images": ["http://127.0.0.1:9/x.jpg"]},
            {"images": ["small.png"], "__dj__meta__": {"image_tags": [["done"]]}}]
    with OpenAIServer() as server:
        recipe = recipe_for(tmp_path, server, rows, **PRICES, max_pixels=28 * 28 * 4)
        assert main(["run", "--config", str(recipe), "--dry-run"]) == 0
        assert server.count == 0
    out = capsys.readouterr().out
    assert "no request sent" in out
    lines = {line.rsplit(None, 1)[0].strip(): line.rsplit(None, 1)[1] for line in out.splitlines()[1:9]}
    assert lines["rows"] == "4" and lines["rows already tagged (kept)"] == "1"
    assert lines["images"] == "5" and lines["images that open"] == "2" and lines["bad images"] == "2"
    assert lines["URLs (not fetched)"] == "1"
    assert "file not found" in out and "not an image" in out
    assert not (tmp_path / "out.jsonl").exists()


def test_cost_is_reported_from_the_servers_token_counts(tmp_path, photo_dir):
    rows = [{"images": [str(photo_dir / "coffee.jpg")], "text": f"row {i}"} for i in range(3)]
    with OpenAIServer() as server:
        server.behaviour = lambda body, attempt: Reply.tags(["cup"], usage={"prompt_tokens": 100,
                                                                             "completion_tokens": 10,
                                                                             "total_tokens": 110})
        assert main(["-q", "run", "--config", str(recipe_for(tmp_path, server, rows, **PRICES))]) == 0
    stats = json.loads((tmp_path / "out.jsonl.stats.json").read_text())
    assert stats["prompt_tokens"] == 300 and stats["completion_tokens"] == 30
    assert stats["cost"] == 300 * 1000 / 1e6 + 30 * 2000 / 1e6  # 0.3 + 0.06


def test_max_cost_stops_the_run_before_it_spends_more(tmp_path, photo_dir, capsys):
    rows = [{"images": [str(photo_dir / "coffee.jpg")], "text": f"row {i}"} for i in range(40)]
    with OpenAIServer() as server:
        server.behaviour = lambda body, attempt: Reply.tags(["cup"], usage={"prompt_tokens": 100,
                                                                             "completion_tokens": 10,
                                                                             "total_tokens": 110})
        # each answer costs 0.12 (100 + 10 tokens reported); a first round of 4 is estimated from the image
        # size, prompt and answer budget (max_tokens) before any answer is known; later rounds from the average
        # so far. With the default budget (256 tokens) a first round of 4 would already be priced over 3.0.
        recipe = recipe_for(tmp_path, server, rows, **PRICES, max_cost=3.0, sampling_params={"max_tokens": 64})
        assert main(["run", "--config", str(recipe)]) == 1
        spent = server.count * 0.12
        assert 0 < spent <= 3.0, server.count
        assert spent > 3.0 - 2 * 4 * 0.12  # it went on while rounds still fitted the budget
    out = capsys.readouterr().out
    assert "max_cost=3 reached" in out


def test_max_cost_without_prices_is_a_config_error(tmp_path, capsys):
    with OpenAIServer() as server:
        recipe = recipe_for(tmp_path, server, [{"images": []}], max_cost=5)
        assert main(["run", "--config", str(recipe)]) == 2
    assert "max_cost needs" in capsys.readouterr().err
