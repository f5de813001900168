"""The API engine end to end against a real third-party OpenAI-compatible server: `transformers serve`.

It hosts the tiny random SmolVLM folder on 127.0.0.1 (offline). Its answers are gibberish, so the test checks
what a user would: every request reaches the server and gets an answer, the image changes the answer, usage is
counted, and the operator ends every image with tags or an error record while the rows stay intact.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from vlmtag import ImageTaggingVLMMapper
from vlmtag.engines import EngineSettings, Request, create_engine
from vlmtag.images import load_image

SERVING_MODULES = ("fastapi", "uvicorn", "openai", "transformers")
STARTUP_TIMEOUT_S = 180.0

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in SERVING_MODULES),
    reason="transformers[serving] is not installed (pip install 'transformers[serving]')",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_smolvlm(tiny_vlm_dirs, tmp_path_factory):
    """`transformers serve <tiny SmolVLM>` on a free loopback port; yields (base_url, model folder)."""
    model = str(tiny_vlm_dirs["smolvlm"])
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
               "serve", model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/v1", model
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_api_engine_gets_an_answer_per_image_from_transformers_serve(served_smolvlm, photo_dir):
    base_url, model = served_smolvlm
    settings = EngineSettings(
        model=model, kind="api", model_params={"base_url": base_url, "api_key": "unused"},
        sampling_params={"max_tokens": 12}, concurrency=4,
    )
    names = ("astronaut.jpg", "coffee.jpg", "chelsea.jpg", "rocket.jpg")
    requests = [Request(image=load_image(str(photo_dir / n)), system_prompt="Tag images.", user_text="Tag this image.")
                for n in names]
    with create_engine(settings) as engine:
        responses = engine.generate(requests)
    assert all(r.ok and r.status in (None, 200) for r in responses), [r.error for r in responses]
    assert all(r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12 for r in responses)
    assert len({r.text for r in responses}) > 1  # the image reaches the model and changes its answer


def test_operator_over_transformers_serve_ends_every_image_with_tags_or_an_error(served_smolvlm, photo_dir):
    base_url, model = served_smolvlm
    op = ImageTaggingVLMMapper(
        model, is_api_model=True, model_params={"base_url": base_url, "api_key": "unused", "timeout": 60},
        sampling_params={"max_tokens": 16}, try_num=2, retry_backoff=0, max_tags=5,
    )
    rows = [
        {"id": 1, "images": ["astronaut.jpg", "coffee.jpg"], "text": "<__dj__image> two photos"},
        {"id": 2, "images": ["rocket.jpg"]},
        {"id": 3, "images": ["missing.jpg"], "text": "a file that is not there"},
    ]
    try:
        out = op.process_rows([dict(r) for r in rows], base_dir=str(photo_dir))
    finally:
        op.close()

    assert [{k: v for k, v in r.items() if k != "__dj__meta__"} for r in out] == rows
    outcomes = [
        (meta["image_tags"][i], meta["image_tags_errors"][i])
        for meta, row in ((r["__dj__meta__"], r) for r in out)
        for i in range(len(row["images"]))
    ]
    assert len(outcomes) == 4
    for tags, error in outcomes:
        assert (error is None and 1 <= len(tags) <= 5) or (tags == [] and error)
    assert outcomes[3][0] == [] and "missing.jpg" in outcomes[3][1]  # never sent: the image error is kept
    assert 3 <= op.stats.requests <= 6 and op.stats.prompt_tokens > 0 and op.stats.completion_tokens > 0

