"""`import vlmtag` and its light parts stay light: no codec, HTTP client, database, Ray, Arrow or torch is loaded
until something that needs it is used. Each check runs in a fresh interpreter, so what other tests imported
does not count."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ["sqlite3", "cv2", "httpx", "ray", "pyarrow", "torch", "PIL", "simplejpeg", "numpy"]
CODECS = ["cv2", "PIL", "simplejpeg"]


def loaded_after(statement: str, modules: list[str]) -> list[str]:
    """Which of `modules` (or their submodules) are in sys.modules after `statement`, in a new interpreter."""
    code = (
        f"import sys, json\n{statement}\n"
        f"names = {modules!r}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(names))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("statement,modules", [
    ("import vlmtag, vlmtag.tags", HEAVY),
    ("import vlmtag.engines.base", CODECS),
])
def test_light_imports_load_no_heavy_module(statement, modules):
    assert loaded_after(statement, modules) == []


def test_the_lazy_names_still_resolve():
    statement = (
        "import vlmtag\n"
        "from vlmtag import ImageTaggingVLMMapper, RunAborted, TagParseError, parse_output, __version__\n"
        "from vlmtag.images import EncodedImage, prepare_image\n"
        "from vlmtag.images.prepare import EncodedImage as E2, DEFAULT_MAX_PIXELS\n"
        "from vlmtag.engines.base import EncodedImage as E3\n"
        "from vlmtag.cache import SqliteAnswerCache\n"
        "assert EncodedImage is E2 is E3\n"
        "assert ImageTaggingVLMMapper.__name__ == 'ImageTaggingVLMMapper'"
    )
    assert "cv2" in loaded_after(statement, CODECS)  # prepare_image was asked for, so its codecs are loaded


def test_the_api_engine_loads_its_http_client_when_it_starts_not_when_it_is_built():
    build = (
        "from vlmtag.engines import EngineSettings, create_engine\n"
        "engine = create_engine(EngineSettings(kind='api', model='m', "
        "model_params={'base_url': 'http://127.0.0.1:9/v1'}))"
    )
    clients = ["aiohttp", "httpx"]
    assert loaded_after("import vlmtag.run\n" + build, clients) == []  # a run's first images load meanwhile
    assert loaded_after(build + "\nengine.start()\nengine.close()", clients) == ["aiohttp"]


def test_the_command_loads_rich_only_to_print():
    """A `vlmtag run` writing to a log prints nothing before its summary: rich is not loaded on the way to the
    first request (the recipe, the run, the progress lines), only when the summary is printed."""
    statement = (
        "import vlmtag.cli, vlmtag.cli.run, vlmtag.run, vlmtag.summary, vlmtag.progress\n"
        "from vlmtag.cli.console import LazyConsole\n"
        "console = LazyConsole(soft_wrap=True)\n"
        "with vlmtag.progress.progress_reporter(console, 10) as progress:\n"
        "    assert progress is not None and not console.is_terminal\n"
    )
    assert loaded_after(statement, ["rich"]) == []
    assert loaded_after(statement + "console.print('summary')", ["rich"]) == ["rich"]
