"""sugam: run and serve Qwen-family reasoning models fast on the hardware you already own."""

from .engine.sequence import CompletionOutput, RequestOutput
from .errors import SugamError
from .llm import LLM
from .sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "SugamError", "__version__"]
