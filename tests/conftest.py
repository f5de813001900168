"""Shared fixtures: real public-domain photos from scikit-image, written to disk as a user would have them, and a
loopback OpenAI-compatible server that answers what each row's text says (`say`); a module may define its own."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from openai_server import OpenAIServer, say

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket")


def photo(name: str) -> Image.Image:
    """A scikit-image sample photo (public domain) as an RGB PIL image."""
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def jpeg_bytes(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """A folder with astronaut.jpg, coffee.jpg, chelsea.jpg, rocket.jpg (real photos)."""
    d = tmp_path_factory.mktemp("photos")
    for name in PHOTO_NAMES:
        photo(name).save(d / f"{name}.jpg", quality=90)
    return d


DEMO_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "data-juicer-demo"


@pytest.fixture(scope="session")
def tiny_vlm_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight Qwen2.5-VL and SmolVLM model folders, built from configs once per run (no download)."""
    from tiny_vlm import build_tiny_qwen2_5_vl, build_tiny_smolvlm

    root = tmp_path_factory.mktemp("tiny-vlms")
    return {"qwen2_5_vl": build_tiny_qwen2_5_vl(root / "qwen2_5_vl"), "smolvlm": build_tiny_smolvlm(root / "smolvlm")}


@pytest.fixture
def server():
    with OpenAIServer() as s:
        s.behaviour = say
        yield s
