"""vlmtag's tagger as a Data-Juicer operator: `vlmtag_image_tagging_mapper`, for `dj-process` recipes where the
tagger sits between Data-Juicer's own filters, deduplicators and mappers.

Set-up is `pip install 'vlmtag[dj]'`: the package declares a `data_juicer.ops` entry point, which Data-Juicer
imports when `data_juicer.ops` is imported. Without the entry point (vlmtag from a checkout, not installed), a
recipe lists this package's `vlmtag_image_tagging_mapper.py` under `custom_operator_paths`
(`python -m vlmtag.dj` prints the path). Loading it both ways in one run is harmless.

This package imports Data-Juicer only in `vlmtag.dj.mapper` (the operator); nothing else in vlmtag imports it,
so vlmtag works without Data-Juicer installed. `vlmtag.dj.signature` (the operator's arguments) and the
constants below import nothing of Data-Juicer.
"""

from __future__ import annotations

import os

#: The name the operator is registered under in Data-Juicer's OPERATORS registry.
OP_NAME = "vlmtag_image_tagging_mapper"
#: Data-Juicer's own tagger, which vlmtag's operator serves in its place only when SERVE_DJ_NAME_ENV is set.
DJ_OP_NAME = "image_tagging_vlm_mapper"
#: The opt-in switch: `VLMTAG_REPLACE_DJ_TAGGER=1 dj-process --config recipe.yaml` runs recipes that name
#: `image_tagging_vlm_mapper` with vlmtag's implementation. Never a side effect of installing.
SERVE_DJ_NAME_ENV = "VLMTAG_REPLACE_DJ_TAGGER"


def serve_dj_name() -> bool:
    """Whether the opt-in switch is on (`1`, `true`, `yes` or `on`)."""
    return os.environ.get(SERVE_DJ_NAME_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def plugin_path() -> str:
    """The file to list under a recipe's `custom_operator_paths` (absolute path)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "vlmtag_image_tagging_mapper.py")


def default_cache_path() -> str:
    """Where the operator keeps its answer cache unless the recipe says `cache_path`: one SQLite file per user,
    `$XDG_CACHE_HOME/vlmtag/answers.sqlite` (`~/.cache/vlmtag/answers.sqlite`). Not Data-Juicer's `work_dir`,
    which gets a new job id on every run, so a cache there would never be found again."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "vlmtag", "answers.sqlite")


__all__ = ["DJ_OP_NAME", "OP_NAME", "SERVE_DJ_NAME_ENV", "default_cache_path", "plugin_path", "serve_dj_name"]
