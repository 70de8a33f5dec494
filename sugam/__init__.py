"""sugam: run and serve Qwen-family reasoning models fast on the hardware you already own."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import SugamError

if TYPE_CHECKING:
    from .engine.sequence import CompletionOutput, RequestOutput
    from .llm import LLM
    from .lora.adapter import LoRARequest
    from .sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "LoRARequest", "RequestOutput", "SamplingParams", "SugamError", "__version__"]

# The public names are imported on first use (PEP 562), so that importing a light submodule does
# not import torch: the server's chat-template worker processes import only sugam.chat_template.
_LAZY = {"LLM": ".llm", "SamplingParams": ".sampling_params", "RequestOutput": ".engine.sequence",
         "CompletionOutput": ".engine.sequence", "LoRARequest": ".lora.adapter"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
