"""The Data-Juicer tier (`make test-dj`, its own `.venv-dj`): the real `dj-process` against the loopback OpenAI
server, on a small dataset whose every row says which tags the server answers for it ("say: cup saucer").

Every test module here sets `pytestmark = pytest.mark.dj`, and the default `make test` deselects them; nothing
here imports Data-Juicer at module level, so collecting them without it is harmless. Helpers and fixtures live in
this module, not in a conftest.py: a second `conftest` module would shadow tests/conftest.py for the test modules
that import from it. Fixtures are in the test modules. `dj-process` runs as a subprocess with
`UV_OFFLINE=1` and `PIP_NO_INDEX=1`, so a run-time install by Data-Juicer fails instead of downloading, and
`assert_no_installs` checks its log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image

from openai_server import OpenAIServer

DJ_PROCESS = str(Path(sys.executable).with_name("dj-process"))
MISSING = "missing.jpg"
SECRET = "sk-test-from-env-4242"  # the API key, given as ${VLMTAG_TEST_KEY} in the recipes


@dataclass
class Dataset:
    """A JSONL dataset of real image files, and what the export must hold for each row kept."""

    path: Path
    image_dir: Path
    rows: list[dict]
    kept: list[int]  # indices of the rows the recipe's filter keeps
    expected: dict[int, tuple[list, list]] = field(default_factory=dict)  # row -> (tags per image, errors)
    distinct_requests: int = 0


def write_images(folder: Path, n: int) -> list[str]:
    """n distinct small photos-to-be: every third a PNG, the others JPEGs. Returns their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img{i}.png" if i % 3 == 0 else f"img{i}.jpg"
        Image.new("RGB", (40 + i, 30 + 2 * i), ((37 * i) % 256, (91 * i) % 256, 200)).save(folder / name)
        names.append(name)
    return names


def make_dataset(root: Path) -> Dataset:
    """Rows with a filter to pass (text of 10+ characters), repeated paths in a row, a missing image, a row without
    images, and a meta struct already present (so Arrow types `__dj__meta__` from the first batch written)."""
    images = root / "images"
    names = write_images(images, 10)
    texts_tags = [
        ("<__dj__image> say: red-square #one", [["red-square", "one"]]),
        ("<__dj__image> say: blue circle", [["blue", "circle"]]),
        ("<__dj__image> say: green #leaf plant", [["green", "leaf", "plant"]]),
        ("<__dj__image> say: cup saucer", [["cup", "saucer"]]),
        ("<__dj__image> say: cat sofa", [["cat", "sofa"]]),
        ("<__dj__image> say: rocket launch", [["rocket", "launch"]]),
    ]
    rows, expected = [], {}
    for i, (text, tags) in enumerate(texts_tags):
        rows.append({"images": [f"images/{names[i]}"], "text": text})
        expected[i] = (tags, [None])
    # repeated path in one row: tags aligned with every entry, one request for the image
    rows.append({"images": [f"images/{names[6]}", f"images/{names[7]}", f"images/{names[6]}"],
                 "text": "<__dj__image> say: multi pic <|__dj__eoc|>"})
    expected[6] = ([["multi", "pic"]] * 3, [None] * 3)
    rows.append({"images": [f"images/{names[8]}"], "text": "short"})  # removed by the filter (min_len 10)
    rows.append({"images": [], "text": "say: no images here"})
    expected[8] = ([[]], [None])
    rows.append({"images": [f"images/{MISSING}", f"images/{names[9]}"], "text": "<__dj__image> say: late #failure"})
    expected[9] = ([[], ["late", "failure"]], [f"file not found: {images / MISSING}", None])
    rows.append({"images": [f"images/{names[2]}"], "text": "<__dj__image> say: same image other text"})
    expected[10] = ([["same", "image", "other", "text"]], [None])
    for row in rows:
        row["__dj__meta__"] = {"source": "set-a"}
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = [i for i in range(len(rows)) if i != 7]
    return Dataset(path=path, image_dir=images, rows=rows, kept=kept, expected=expected, distinct_requests=10)


def tagger_args(server: OpenAIServer, tmp_path: Path, **extra) -> dict:
    args = {"api_or_hf_model": "test-model", "is_api_model": True,
            "model_params": {"base_url": server.base_url, "api_key": "${VLMTAG_TEST_KEY}", "timeout": 60},
            "retry_backoff": 0.01, "batch_size": 2, "cache_path": str(tmp_path / "answers.sqlite")}
    args.update(extra)
    return args


def recipe(dataset: Dataset | Path, export: Path, tagger: dict, *, op_name: str = "vlmtag_image_tagging_mapper",
           **keys) -> dict:
    """A DJ filter before the tagger and a DJ mapper after it."""
    return {
        "project_name": "vlmtag-dj-test",
        "dataset_path": str(dataset.path if isinstance(dataset, Dataset) else dataset),
        "export_path": str(export),
        "np": 1,
        "use_cache": False,  # Data-Juicer's dataset cache: off, so a rerun really runs the operator
        "keep_stats_in_res_ds": True,
        **keys,
        "process": [
            {"text_length_filter": {"min_len": 10}},
            {op_name: tagger},
            {"remove_specific_chars_mapper": {"chars_to_remove": "#"}},
        ],
    }


def dj_env(tmp_path: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.update({"UV_OFFLINE": "1", "PIP_NO_INDEX": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),
                "VLMTAG_TEST_KEY": SECRET,
                "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")})
    env.pop("VLMTAG_REPLACE_DJ_TAGGER", None)
    env.update(extra)
    return env


def run_dj(tmp_path: Path, recipe_dict: dict, *, env: dict | None = None, python_prelude: str | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """`dj-process --config recipe.yaml`, as a user runs it (or, with `python_prelude`, the same entry point after
    some Python, e.g. hiding the entry point)."""
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(recipe_dict))
    if python_prelude is None:
        cmd = [DJ_PROCESS, "--config", str(path)]
    else:
        code = (f"{python_prelude}\nimport sys\nfrom data_juicer.tools.process_data import main\n"
                f"sys.argv = ['dj-process', '--config', {str(path)!r}]\nmain()\n")
        cmd = [sys.executable, "-c", code]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or dj_env(tmp_path),
                          cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert_no_installs(proc.stdout + proc.stderr)
    return proc


def assert_no_installs(log: str) -> None:
    for marker in ("using uv", "uv pip install", "Installing package", "falling back to pip"):
        assert marker not in log, f"Data-Juicer tried to install something at run time ({marker!r})"


def read_export(export: Path) -> list[dict]:
    """The export's rows, with `__dj__meta__` joined back from `<export>_stats.jsonl` when Data-Juicer wrote it
    there (its default, `keep_stats_in_res_ds: false`)."""
    rows = [json.loads(line) for line in export.read_text().splitlines() if line.strip()]
    stats = export.with_name(export.stem + "_stats.jsonl")
    if rows and "__dj__meta__" not in rows[0] and stats.exists():
        side = [json.loads(line) for line in stats.read_text().splitlines() if line.strip()]
        assert len(side) == len(rows)
        for row, extra in zip(rows, side):
            row.update(extra)
    return rows


def assert_tagged_exactly(rows: list[dict], dataset: Dataset, field: str = "image_tags") -> None:
    """Rows filtered only by the filter, in order; tags and errors exact and aligned with `images`; paths absolute;
    the mapper after the tagger ran (`#` removed); other meta fields kept."""
    assert len(rows) == len(dataset.kept)
    for row, i in zip(rows, dataset.kept):
        source = dataset.rows[i]
        assert row["images"] == [str(dataset.path.parent / p) for p in source["images"]]
        assert row["text"] == source["text"].replace("#", "")
        tags, errors = dataset.expected[i]
        meta = row["__dj__meta__"]
        assert meta[field] == tags, (i, meta)
        assert meta[f"{field}_errors"] == errors, (i, meta)
        assert meta["source"] == "set-a"
