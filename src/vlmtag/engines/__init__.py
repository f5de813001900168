"""Inference engines behind one batch-in/batch-out interface (see `base.Engine`): transports only.

Imports nothing of vlmtag's datasets, io, ops or cache. Heavy engines are imported lazily, so `import vlmtag`
stays light and an engine's extra is needed only when that engine is used.
"""

from __future__ import annotations

from vlmtag.engines.base import Engine, EngineError, EngineSettings, Request, Response, Usage

__all__ = ["Engine", "EngineError", "EngineSettings", "Request", "Response", "Usage", "create_engine"]


def create_engine(settings: EngineSettings) -> Engine:
    """Build the engine named by `settings.kind`."""
    if settings.kind == "api":
        from vlmtag.engines.api import ApiEngine

        return ApiEngine(settings)
    if settings.kind == "embedded":
        from vlmtag.engines.embedded import EmbeddedEngine

        return EmbeddedEngine(settings)
    if settings.kind == "hf":
        from vlmtag.engines.hf import HFEngine

        return HFEngine(settings)
    if settings.kind == "vllm":
        from vlmtag.engines.vllm import VLLMEngine

        return VLLMEngine(settings)
    raise EngineError(f"engine {settings.kind!r} is not available (expected one of: api, embedded, hf, vllm)")
