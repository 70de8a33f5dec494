"""The adapters an engine knows, and which of them sit in the model's LoRA slots.

Registered adapters live in host memory (as loaded from their files); at most `max_loras` of them
are in slots at a time, and the scheduler admits requests so that the running ones never use more
adapters than that (scheduler.py). A step's adapters are put into slots before the forward pass:
one already there stays, another takes a slot no running request uses (least recently used).

Unloading an adapter only forgets its name: requests already using it finish with it. Each load
gets a fresh `cache_salt`, so the prefix cache never hands one adapter's K/V (or a replaced
adapter's) to another.
"""

from __future__ import annotations

import builtins
import itertools
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config import ModelConfig
from ..layers.lora import LoRABatch, LoRAGroup, LoRAProjection, install_lora
from ..lora.adapter import LoRAAdapter, LoRAError, LoRARequest, load_adapter

if TYPE_CHECKING:
    from ..models.qwen2 import CausalLM

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedLoRA:
    """One registered adapter (sequences hold it, so an unloaded adapter serves its last requests)."""
    request: LoRARequest
    adapter: LoRAAdapter
    cache_salt: int

    @property
    def name(self) -> str:
        return self.request.lora_name


class LoRAManager:
    def __init__(self, model: CausalLM, max_loras: int, max_rank: int):
        if max_loras < 1 or max_rank < 1:
            raise LoRAError("--max-loras and --max-lora-rank must be at least 1")
        self.config: ModelConfig = model.config
        self.max_loras, self.max_rank = max_loras, max_rank
        self.batch, self.wrappers = install_lora(model, max_loras, max_rank)
        self.dtype = self.wrappers[0][0].lora_a.dtype
        self._registered: dict[str, LoadedLoRA] = {}
        self._lock = threading.Lock()         # the server adds and removes from its own thread
        self._salts = itertools.count(1)
        self._slots: list[LoadedLoRA | None] = [None] * max_loras
        self._last_used = [0] * max_loras
        self._clock = itertools.count(1)

    # ---- registry (any thread) -----------------------------------------------------------------

    def add(self, request: LoRARequest, adapter: LoRAAdapter | None = None) -> LoadedLoRA:
        """Load (unless given) and check an adapter, then register it under its name. Raises
        LoRAError with the reason; nothing is registered then."""
        if adapter is None:
            adapter = load_adapter(request.lora_path)
        adapter.validate(self.config, self.max_rank)
        with self._lock:
            if request.lora_name in self._registered:
                raise LoRAError(f"an adapter named {request.lora_name!r} is already loaded")
            if any(r.request.lora_int_id == request.lora_int_id for r in self._registered.values()):
                raise LoRAError(f"an adapter with id {request.lora_int_id} is already loaded")
            loaded = LoadedLoRA(request, adapter, next(self._salts))
            self._registered[request.lora_name] = loaded
        log.info("LoRA adapter %r loaded from %s: rank %d, %d matrices, %s", request.lora_name, request.lora_path,
                 adapter.max_rank, len(adapter.weights), ", ".join(adapter.target_modules))
        return loaded

    def remove(self, name: str) -> bool:
        with self._lock:
            return self._registered.pop(name, None) is not None

    def get(self, name: str) -> LoadedLoRA | None:
        with self._lock:
            return self._registered.get(name)

    def list(self) -> list[LoadedLoRA]:
        with self._lock:
            return list(self._registered.values())

    # ---- slots (the engine's thread) ------------------------------------------------------------

    def activate(self, needed: Iterable[LoadedLoRA], in_use: set[LoadedLoRA]) -> dict[LoadedLoRA, int]:
        """Slots for this step's adapters; `in_use`: adapters of all running requests (their slots
        are kept). The scheduler guarantees len(in_use) <= max_loras."""
        slots: dict[LoadedLoRA, int] = {}
        tick = next(self._clock)
        for lora in needed:
            if lora in slots:
                continue
            if lora in self._slots:
                slot = self._slots.index(lora)
            else:
                free = [i for i, held in enumerate(self._slots) if held is None or held not in in_use]
                if not free:
                    raise RuntimeError("more adapters in a step than LoRA slots (a scheduler bug)")
                slot = min(free, key=lambda i: (self._slots[i] is not None, self._last_used[i]))
                self._fill(slot, lora)
            self._last_used[slot] = tick
            slots[lora] = slot
        return slots

    def set_batch(self, groups: builtins.list[LoRAGroup]) -> None:  # `list` is a method here
        self.batch.groups = groups

    def _fill(self, slot: int, lora: LoadedLoRA) -> None:
        adapter = lora.adapter
        for layer, wrappers in enumerate(self.wrappers):
            for wrapper in wrappers:
                wrapper.set_slot(slot, _updates(adapter, layer, wrapper, self.dtype))
        self._slots[slot] = lora
        log.debug("LoRA adapter %r in slot %d", lora.name, slot)


def _updates(adapter: LoRAAdapter, layer: int, wrapper: LoRAProjection,
             dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for module in wrapper.modules_names:
        if (layer, module) in adapter.weights:
            out[module] = (adapter.weights[(layer, module)].a.to(dtype), adapter.scaled_b((layer, module), dtype))
    return out


__all__ = ["LoRABatch", "LoRAManager", "LoadedLoRA"]
