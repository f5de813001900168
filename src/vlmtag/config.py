"""Recipes: Data-Juicer's YAML keys, validated up front so a bad value fails before any work is done."""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlmtag.errors import ConfigError, config_error
from vlmtag.prompts import DEFAULT_EOC_TOKEN, DEFAULT_IMAGE_TOKEN

log = logging.getLogger(__name__)

# Data-Juicer recipe keys vlmtag reads but does not act on (yet): a warning, never a failure.
UNUSED_DJ_KEYS = frozenset(
    {
        "use_checkpoint", "skip_op_error", "open_tracer", "trace_num", "op_fusion", "cache_compress",
        "open_monitor", "suffixes", "turbo", "ds_cache_dir", "hpo_config", "data_probe_algo", "keep_stats_in_res_ds",
        "keep_hashes_in_res_ds", "export_shard_size", "export_in_parallel", "save_stats_in_one_file", "op_list_to_trace",
        "auto", "auto_num", "adaptive_batch_size", "percentiles", "export_original_dataset", "debug", "validators",
        "event_logging", "temp_dir", "open_insight_mining", "op_list_to_mine", "generated_dataset_config",
        "load_dataset_kwargs", "fusion_strategy", "export_type", "export_aws_credentials", "dataset",
    }
)
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class Recipe(BaseModel):
    model_config = ConfigDict(extra="allow")

    project_name: Optional[str] = None
    dataset_path: str = Field(min_length=1)
    export_path: str = Field(min_length=1)
    np: int = Field(1, ge=1)
    text_keys: Union[str, list[str]] = "text"
    image_key: str = "images"
    image_bytes_key: str = "image_bytes"
    image_special_token: str = DEFAULT_IMAGE_TOKEN
    eoc_special_token: str = DEFAULT_EOC_TOKEN
    executor_type: Literal["default", "ray"] = "default"
    ray_address: str = "auto"
    use_cache: bool = True
    work_dir: Optional[str] = None
    process: list[dict[str, Optional[dict[str, Any]]]] = Field(min_length=1)

    @property
    def text_key(self) -> str:
        return self.text_keys if isinstance(self.text_keys, str) else (self.text_keys[0] if self.text_keys else "text")


def expand_env(value: Any, key: str = "") -> Any:
    """Expand `${VAR}` and `${VAR:-default}` in every string of a recipe (API keys stay out of recipe files)."""
    if isinstance(value, dict):
        return {k: expand_env(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{key}.{i}") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"recipe key {key!r}: environment variable {name} is not set")

    return _ENV.sub(sub, value)


def set_override(raw: dict, assignment: str) -> None:
    """Apply `--set key=value`: a dotted key (list items by index; `op.` = the first op's arguments);
    the value is read as YAML, so `8` is a number and `[a, b]` a list."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, _, text = assignment.partition("=")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    if parts[0] == "op":
        process = raw.get("process") or []
        if not process or not isinstance(process[0], dict) or len(process[0]) != 1:
            raise ConfigError(f"--set {key}: the recipe has no operator in 'process'")
        (name,) = process[0]
        if process[0][name] is None:
            process[0][name] = {}
        parts = ["process", "0", name] + parts[1:]
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError):
                raise ConfigError(f"--set {key}: no list item {part!r}") from None
        else:
            if node.get(part) is None:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (ValueError, IndexError):
            raise ConfigError(f"--set {key}: no list item {last!r}") from None
    else:
        node[last] = value


def load_recipe_dict(path: str, overrides: list[str] = ()) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of keys at the top level")
    for assignment in overrides:
        set_override(raw, assignment)
    return raw


def parse_recipe(raw: dict) -> Recipe:
    raw = expand_env(raw)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise config_error(e, "recipe", Recipe.model_fields) from None
    for key in sorted(recipe.model_extra or {}):
        if key in UNUSED_DJ_KEYS:
            log.warning("recipe key %r is a Data-Juicer setting vlmtag does not use; ignored", key)
        else:
            log.warning("unknown recipe key %r; ignored", key)
    for i, item in enumerate(recipe.process):
        if len(item) != 1:
            raise ConfigError(f"recipe: process[{i}]: expected one operator name per list item, got {sorted(item)}")
    return recipe


def build_ops(recipe: Recipe) -> list:
    """Instantiate the recipe's operators; the recipe's global keys are defaults for each op's own ones."""
    from vlmtag.ops import get_operator, operator_names

    others = [(i, name) for i, item in enumerate(recipe.process) for name in item if name not in operator_names()]
    if others:
        raise ConfigError(other_operators_message(others, operator_names()))
    ops = []
    for i, item in enumerate(recipe.process):
        ((name, args),) = item.items()
        cls = get_operator(name)
        args = dict(args or {})
        defaults = {
            "text_key": recipe.text_key,
            "image_key": recipe.image_key,
            "image_bytes_key": recipe.image_bytes_key,
            "image_special_token": recipe.image_special_token,
            "eoc_special_token": recipe.eoc_special_token,
        }
        for k, v in defaults.items():
            args.setdefault(k, v)
        try:
            ops.append(cls(**args))
        except ConfigError as e:
            raise ConfigError(f"recipe: process[{i}]: {e}") from None
        except TypeError as e:
            raise ConfigError(f"recipe: process[{i}]: {name}: {e}") from None
    return ops


def other_operators_message(others: list[tuple[int, str]], ours: list[str]) -> str:
    """The one message for a recipe that names operators vlmtag does not run: which ones, and how to run the whole
    recipe with Data-Juicer's `dj-process` and vlmtag's operator inside it (README "Inside Data-Juicer")."""
    from vlmtag.dj import DJ_OP_NAME, OP_NAME, SERVE_DJ_NAME_ENV

    if len(others) == 1:
        i, name = others[0]
        listed = f"operator {name!r} is not available in vlmtag (process[{i}])"
    else:
        names = ", ".join(f"{name!r} (process[{i}])" for i, name in others)
        listed = f"operators {names} are not available in vlmtag"
    note = ""
    if any(name == OP_NAME for _, name in others):
        note = f" ({OP_NAME} is vlmtag's operator inside Data-Juicer; `vlmtag run` calls it {DJ_OP_NAME})"
    return (
        f"recipe: {listed}{note}; vlmtag runs only {', '.join(ours)}. Run the whole recipe with Data-Juicer "
        "instead, with vlmtag's operator in it: pip install 'vlmtag[dj]', then either "
        f"rename {DJ_OP_NAME} to {OP_NAME} in the recipe and run `dj-process --config RECIPE`, or keep the recipe "
        f"as it is and run `{SERVE_DJ_NAME_ENV}=1 dj-process --config RECIPE` (README: \"Inside Data-Juicer\")"
    )
