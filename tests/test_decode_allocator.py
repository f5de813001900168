"""glibc's allocator while photos are prepared: freed buffers are kept for the next photo, not faulted in anew,
and settings the user made are left alone (`vlmtag.images.memory.tune_allocator`)."""

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
# glibc raises its own thresholds after freeing one, unless a threshold was set).
PREPARE_PHOTOS = """
import hashlib, os, resource, sys
from concurrent.futures import ThreadPoolExecutor
from vlmtag.images.prepare import prepare_image
def one(path):
    with open(path, "rb") as f:
        raw = f.read()
    return prepare_image(raw, sha256=hashlib.sha256(raw).hexdigest()).data
paths = sorted(os.path.join(sys.argv[1], name) for name in os.listdir(sys.argv[1]))
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


def faults_per_photo(folder, **env) -> float:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PREPARE_PHOTOS, str(folder)], capture_output=True, text=True,
                         env={**clean, **env}, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_freed_buffers_are_kept_for_the_next_photo(full_hd_photos):
    kept = faults_per_photo(full_hd_photos)
    # What vlmtag set before: an 8 MiB mmap threshold alone, which leaves glibc's trim threshold at 128 KiB (the
    # user's setting, so vlmtag leaves it): every photo faults its megabytes of buffers in again (~1,200 pages
    # each, measured), where kept buffers are reused.
    returned = faults_per_photo(full_hd_photos, MALLOC_MMAP_THRESHOLD_=str(8 << 20))
    assert kept * 4 < returned, (kept, returned)


def test_settings_the_user_made_are_left_alone():
    code = ("from vlmtag.images import memory\n"
            "calls = []\n"
            "class LibC:\n"
            "    def __getattr__(self, name):\n"
            "        return lambda *a: calls.append((name, a)) or 1\n"
            "memory.ctypes.CDLL = lambda name: LibC()\n"
            "memory.tune_allocator()\n"
            "print(sorted(name for name, _ in calls))")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    for env, expected in (({}, "['mallopt', 'mallopt']"), ({"MALLOC_TRIM_THRESHOLD_": "0"}, "[]"),
                          ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, "[]")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**clean, **env})
        assert out.stdout.strip() == expected, env
