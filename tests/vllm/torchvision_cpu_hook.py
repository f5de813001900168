"""Lets PyPI's torchvision (a CUDA build) import next to the CPU torch, for vLLM's CPU build.

Installed by `make test-vllm` into `.venv-vllm` as `_vlmtag_torchvision_cpu.py` plus a one-line `.pth` file.
PyPI has no CPU torchvision for Linux (those wheels live only on download.pytorch.org), and the CUDA build's C++
extension cannot load beside a CPU torch. torchvision's pure-Python image transforms (what transformers'
Qwen2-VL image processor, and so vLLM's Qwen2.5-VL code, use) still work, but `import torchvision` fails
first: it registers fake kernels for `torchvision::nms` and `torchvision::qnms` unconditionally, and those
operators only exist when the extension loaded ("operator torchvision::nms does not exist").

This hook waits until something imports torchvision (so Python starts as fast as before and torch is not
imported early), then defines the two operators' schemas with `torch.library` when the extension will not
load. Nothing else changes: the C++ ops (nms, roi_align, video decoding) stay unavailable, and nothing vlmtag or
vLLM's Qwen2.5-VL path uses needs them.
"""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARIES: list = []  # keep the torch.library fragment alive for the life of the process


def define_torchvision_schemas(package_dir: str | None) -> bool:
    """Define torchvision::nms and ::qnms when torchvision's extension cannot load; True when this defined them."""
    import torch

    for lib_path in sorted(Path(package_dir).glob("_C*.so")) if package_dir else ():
        try:
            torch.ops.load_library(str(lib_path))  # a matching build: its ops are real, nothing to do
            return False
        except (ImportError, OSError):
            break
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        lib.define(schema)
    _LIBRARIES.append(lib)
    return True


class _Finder:
    """A meta-path finder that only watches for the first `import torchvision`, then steps aside."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(cls)
            try:
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                locations = list(spec.submodule_search_locations or []) if spec else []
                define_torchvision_schemas(locations[0] if locations else None)
            except Exception:  # noqa: BLE001 - never break an import that might have worked anyway
                pass


def install() -> None:
    if "torchvision" not in sys.modules and _Finder not in sys.meta_path:
        sys.meta_path.insert(0, _Finder)


install()
