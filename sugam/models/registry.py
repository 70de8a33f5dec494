"""Architectures sugam runs, keyed by the family name the config readers produce (config.py maps
HF `model_type` and GGUF `general.architecture` onto it). Adding a model: write its class (a
`CausalLM` subclass), decorate it with `@register_model("name")`, map its file names in config.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from ..errors import ModelFormatError

if TYPE_CHECKING:
    from .qwen2 import CausalLM

_MODELS: dict[str, type[CausalLM]] = {}
M = TypeVar("M", bound="type[CausalLM]")


def register_model(architecture: str) -> Callable[[M], M]:
    def register(cls: M) -> M:
        _MODELS[architecture] = cls
        return cls
    return register


def supported_architectures() -> tuple[str, ...]:
    _load_builtin()
    return tuple(_MODELS)


def model_class(architecture: str) -> type[CausalLM]:
    """The class for an architecture, or a clear error naming the ones sugam runs."""
    _load_builtin()
    cls = _MODELS.get(architecture)
    if cls is None:
        raise ModelFormatError(f"unsupported architecture {architecture!r}; "
                               f"sugam runs {', '.join(supported_architectures())}")
    return cls


def _load_builtin() -> None:
    from . import moe, qwen2  # noqa: F401  (registers the built-in architectures)
