"""The allocator settings of vlmtag's own processes: photos prepared on threads stop faulting their buffers in anew."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import photo

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

# Each photo prepared as the loader does it (read, hashed, decoded at a reduced scale, resized, encoded), on four
# threads, in a process that has done nothing else first (a big buffer freed earlier would hide the difference:
# glibc raises its thresholds after freeing one).
PREPARE_PHOTOS = """
import hashlib, os, resource, sys
from concurrent.futures import ThreadPoolExecutor
if sys.argv[1] == "keep":
    from vlmtag.allocator import keep_freed_memory
    assert keep_freed_memory()
from vlmtag.images.prepare import prepare_image
def one(path):
    with open(path, "rb") as f:
        raw = f.read()
    return prepare_image(raw, sha256=hashlib.sha256(raw).hexdigest()).data
paths = sorted(os.path.join(sys.argv[2], name) for name in os.listdir(sys.argv[2]))
one(paths[0])
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
with ThreadPoolExecutor(4) as pool:
    out = list(pool.map(one, paths * 8))
assert all(o[:2] == b"\\xff\\xd8" for o in out)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / len(out))
"""


@pytest.fixture(scope="module")
def full_hd_photos(tmp_path_factory):
    """Full-HD JPEGs made from a real photo: upscaled, with film grain, so they weigh what camera photos do."""
    folder = tmp_path_factory.mktemp("full-hd")
    base = np.asarray(photo("astronaut").resize((1920, 1080), Image.BICUBIC), dtype=np.int16)
    for i in range(8):
        grain = np.random.default_rng(i).integers(-6, 7, base.shape, dtype=np.int16)
        Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return folder


def faults_per_photo(mode: str, folder) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PREPARE_PHOTOS, mode, str(folder)], capture_output=True, text=True,
                         env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_freed_buffers_are_kept_for_the_next_photo(full_hd_photos):
    default, kept = faults_per_photo("default", full_hd_photos), faults_per_photo("keep", full_hd_photos)
    # by default every photo faults its megabytes of buffers in again (~1,200 pages each, measured); kept, the
    # next photo reuses them
    assert kept * 4 < default, (kept, default)


def test_settings_the_user_made_are_left_alone():
    code = "from vlmtag.allocator import keep_freed_memory; print(keep_freed_memory())"
    for env in ({"MALLOC_MMAP_THRESHOLD_": "65536"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **env})
        assert out.stdout.strip() == "False"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})
    assert out.stdout.strip() == "True"
