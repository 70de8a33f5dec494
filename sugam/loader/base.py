"""What every loader hands to the engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig


@dataclass
class TokenizerSpec:
    """Everything needed to build the tokenizer and render prompts."""
    # Either a ready `tokenizers.Tokenizer` JSON string (HF folders) ...
    tokenizer_json: str | None = None
    # ... or the pieces of a byte-level BPE (GGUF metadata).
    tokens: list[str] | None = None
    token_types: list[int] | None = None
    merges: list[str] | None = None
    pre_tokenizer: str | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    chat_template: str | None = None
    # Special tokens an HF tokenizer_config.json names by string (bos_token, eos_token, ...).
    special_token_strings: dict[str, str] = field(default_factory=dict)
    # The file the pieces came from, for error messages.
    source: str | None = None


@dataclass
class GenerationDefaults:
    """Sampling defaults and stop ids a checkpoint ships (HF generation_config.json)."""
    eos_token_ids: list[int] = field(default_factory=list)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None


@dataclass
class LoadedCheckpoint:
    path: Path
    config: ModelConfig
    tokenizer: TokenizerSpec
    generation: GenerationDefaults
    # Yields (HF-style parameter name, tensor) pairs; tensors are materialised lazily, one at a time,
    # so that peak memory stays near one copy of the model.
    iter_weights: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    info: dict[str, Any] = field(default_factory=dict)
