"""The Data-Juicer operator's explicit signature, generated from vlmtag's own argument model.

Data-Juicer's preflight rejects any recipe key that an operator's `__init__` does not name (`**kwargs` is not
enough), and its config parser reads the types from that signature. So the operator's `__init__` carries a
generated `__signature__` that names everything, in this order:

1. Data-Juicer's signature of `image_tagging_vlm_mapper`: `api_or_hf_model`, `is_api_model`, then, keyword only,
   `tag_field_name`, `api_endpoint`, `response_path`, `system_prompt`, `input_template`, `model_params`,
   `sampling_params`, `try_num`;
2. every vlmtag option (`TaggerOptions`: `concurrency`, `batch_size`, `max_pixels`, ...), with its type and
   default, so an option added to vlmtag appears here without an edit;
3. the adapter's own: `cache_path`, `use_cache` (the answer cache);
4. Data-Juicer's generic operator arguments (`work_dir`, `num_proc`, `skip_op_error`, ...), given by the caller
   from `OP._BASE_PARAMS`.

No Data-Juicer import here: the unit tests check it without Data-Juicer installed.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

from vlmtag.ops.options import TaggerArguments, TaggerOptions

#: Data-Juicer's own signature for the tagger, in its order (the first two may be positional).
DJ_POSITIONAL = ("api_or_hf_model", "is_api_model")
DJ_KEYWORD = ("tag_field_name", "api_endpoint", "response_path", "system_prompt", "input_template", "model_params",
              "sampling_params", "try_num")
#: The adapter's own arguments: where the answer cache lives, and whether to use it.
ADAPTER_PARAMS: dict[str, tuple[Any, Any]] = {
    "cache_path": (Optional[str], None),  # None: vlmtag.dj.default_cache_path()
    "use_cache": (bool, True),
}
#: vlmtag options whose default the adapter decides (None in the signature):
OVERRIDES: dict[str, tuple[Any, Any]] = {
    # Data-Juicer's recipe-wide special tokens (its `image_special_token` / `eoc_special_token` keys)
    "image_special_token": (Optional[str], None),
    "eoc_special_token": (Optional[str], None),
    # not Data-Juicer's 1,000 (CPU ops) or 10 (CUDA ops): see vlmtag.dj.mapper.default_batch_size
    "batch_size": (Optional[int], None),
}


def tagger_names() -> list[str]:
    """Every argument vlmtag's own operator takes (Data-Juicer's signature plus vlmtag's options)."""
    return list(TaggerArguments.model_fields)


def _field_param(name: str, kind: inspect._ParameterKind) -> inspect.Parameter:
    info = TaggerArguments.model_fields[name]
    annotation, default = info.annotation, info.get_default(call_default_factory=True)
    if name in OVERRIDES:
        annotation, default = OVERRIDES[name]
    return inspect.Parameter(name, kind, default=default, annotation=annotation)


def op_parameters(base_params: Mapping[str, tuple[Any, Any]] = {}) -> list[inspect.Parameter]:
    """The operator's parameters, `self` excluded. `base_params`: Data-Juicer's `{name: (type or None, default)}`
    (`OP._BASE_PARAMS`); those vlmtag already names (`text_key`, `batch_size`, ...) keep vlmtag's default."""
    params = [_field_param(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in DJ_POSITIONAL]
    params += [_field_param(n, inspect.Parameter.KEYWORD_ONLY) for n in DJ_KEYWORD]
    params += [_field_param(n, inspect.Parameter.KEYWORD_ONLY) for n in TaggerOptions.model_fields]
    seen = {p.name for p in params}
    missing = [n for n in tagger_names() if n not in seen]
    params += [_field_param(n, inspect.Parameter.KEYWORD_ONLY) for n in missing]  # TaggerArguments' own, if any
    seen.update(missing)
    for name, (annotation, default) in {**ADAPTER_PARAMS, **base_params}.items():
        if name not in seen:
            seen.add(name)
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=annotation if annotation is not None else Any))
    return params


def op_signature(base_params: Mapping[str, tuple[Any, Any]] = {}) -> inspect.Signature:
    """`op_parameters` with `self` first: the `__signature__` of the operator's `__init__`."""
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return inspect.Signature([self_param, *op_parameters(base_params)])
