"""A small registry of operators by the names recipes use (`process: - image_tagging_vlm_mapper: {...}`)."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T", bound=type)

_OPERATORS: dict[str, type] = {}


def register(name: str) -> Callable[[T], T]:
    def deco(cls: T) -> T:
        _OPERATORS[name] = cls
        return cls

    return deco


def get_operator(name: str) -> type:
    try:
        return _OPERATORS[name]
    except KeyError:
        raise KeyError(name) from None


def operator_names() -> list[str]:
    return sorted(_OPERATORS)
