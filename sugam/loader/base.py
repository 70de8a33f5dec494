"""What every loader hands to the engine."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import torch

from ..config import ModelConfig

if TYPE_CHECKING:
    from ..distributed.sharding import ShardPlan
    from ..quant.formats import GGUFRows, QuantizedWeight
    from ..quant.policy import WeightChooser

    # What a loader yields for one parameter: float values, or a weight kept quantized as the chooser said.
    LoadedWeight: TypeAlias = torch.Tensor | QuantizedWeight | GGUFRows


class WeightIterator(Protocol):
    """Yields (HF-style parameter name, weight) pairs. `choose` picks each weight's format (None:
    float values); `shard` cuts each to a tensor-parallel rank's share before it is converted."""

    def __call__(self, choose: WeightChooser | None = None, shard: ShardPlan | None = None
                 ) -> Iterator[tuple[str, LoadedWeight]]: ...


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
    # Weights are materialised lazily, one at a time, so that peak memory stays near one copy of the model.
    iter_weights: WeightIterator
    info: dict[str, Any] = field(default_factory=dict)
