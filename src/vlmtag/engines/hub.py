"""Where a local engine's model name becomes something it can load: a folder, a cached snapshot, or a hub name.

Checked once, when the engine is built, so that a model that cannot be had fails before any data is read, with
one line that says which model, where it was looked for, and what to do instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

#: Seconds to wait for the hub to answer whether a model exists.
HUB_TIMEOUT_S = 10.0


class ModelNotFound(LookupError):
    """The model is neither a local folder, nor cached, nor reachable on the hub; the message says so in one line."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")


def _advice(name: str) -> str:
    return (
        f"download it where there is network (`hf download {name} --local-dir DIR`) and set api_or_hf_model to "
        "that folder, or use an API model instead (is_api_model: true, model_params.base_url)"
    )


def resolve_model(name: str, model_params: Mapping[str, Any] | None = None) -> str:
    """A local folder for `name` when there is one (the folder itself, or its snapshot in the HF cache), else
    `name` itself once the hub has confirmed it exists (the engine then downloads it as usual).

    Raises `ModelNotFound` with one line when the model is not here and the hub cannot be asked or says no.
    `model_params` may carry `cache_dir`, `revision`, `token` and `local_files_only`, as for `from_pretrained`.
    """
    params = dict(model_params or {})
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if _looks_like_path(name):
        raise ModelNotFound(f"model folder {name!r} does not exist; set api_or_hf_model to a folder with the model")
    try:
        from huggingface_hub import HfApi, constants, snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:
        raise ModelNotFound(
            f"model {name!r} is not a local folder, and huggingface_hub is not installed to look it up; "
            "set api_or_hf_model to a folder with the model"
        ) from None

    cache_dir = params.get("cache_dir") or constants.HF_HUB_CACHE
    revision = params.get("revision")
    try:
        return snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache, or a malformed name: either way, ask the hub
        pass
    offline = (
        bool(params.get("local_files_only"))
        or _env_true("HF_HUB_OFFLINE")
        or _env_true("TRANSFORMERS_OFFLINE")
        or constants.HF_HUB_OFFLINE
    )
    where = f"not a local folder and not in the Hugging Face cache ({cache_dir})"
    if offline:
        raise ModelNotFound(f"model {name!r} is {where}, and hub access is off (offline mode); {_advice(name)}")
    try:
        HfApi(endpoint=constants.ENDPOINT).model_info(
            name, revision=revision, token=params.get("token"), timeout=HUB_TIMEOUT_S
        )
    except GatedRepoError:
        raise ModelNotFound(
            f"model {name!r} is {where}, and it is gated on the hub at {constants.ENDPOINT} "
            f"(accept its licence there and log in: `hf auth login`); {_advice(name)}"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFound(f"model {name!r} has no revision {revision!r} on the hub at {constants.ENDPOINT}") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(
            f"model {name!r} is {where}, and the hub at {constants.ENDPOINT} has no such model "
            f"(or it is private: `hf auth login`); {_advice(name)}"
        ) from None
    except Exception as e:  # noqa: BLE001 - connection errors, timeouts, 5xx, offline mode: out of reach
        raise ModelNotFound(
            f"model {name!r} is {where}, and the hub at {constants.ENDPOINT} could not be reached "
            f"({type(e).__name__}); {_advice(name)}"
        ) from None
    return name
