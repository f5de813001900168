"""Small helpers shared by the vLLM tier's conftest and tests (a module of its own: two conftest.py files cannot
both be imported by name)."""

from __future__ import annotations

import json
from pathlib import Path


def write_recipe(folder: Path, dataset: Path, export: Path, op: dict) -> Path:
    import yaml

    recipe = {"project_name": "vllm-tier", "dataset_path": str(dataset), "export_path": str(export),
              "process": [{"image_tagging_vlm_mapper": op}]}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
