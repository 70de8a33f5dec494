"""Many LoRA adapters over one copy of the base weights, in the same batch.

Each projection group of a layer (q|k|v, o, gate|up, down) is wrapped by a `LoRAProjection` that
holds `max_loras` adapter slots: A stacked as [slots, parts * max_rank, in] and B (already scaled)
as [slots, out, parts * max_rank], zero where an adapter has a smaller rank or skips a module. A
step's rows are grouped by slot (`LoRABatch`, shared by every wrapper of the model); per group the
update is two small matmuls (shrink to the rank, expand to the outputs) added onto the unchanged,
possibly quantized, base product. Rows of the base model belong to no group and cost nothing.

The native decoder (models/native_decode.py) reads the same slots and groups and applies the same
operations in the same order, so both paths give identical results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LoRABatch:
    """Which rows of this step use which slot: (slot, row indices), rows None meaning all rows."""
    groups: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)


def apply_lora(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               groups: list[tuple[int, torch.Tensor | None]]) -> torch.Tensor:
    """y [rows, out] += B_slot (A_slot x) for each group's rows (in place). decoder.cpp's add_lora
    does exactly this."""
    for slot, rows in groups:
        xs = x if rows is None else x.index_select(0, rows)
        delta = torch.matmul(torch.matmul(xs, lora_a[slot].t()), lora_b[slot].t())
        if rows is None:
            y.add_(delta)
        else:
            y.index_add_(0, rows, delta)
    return y


class LoRAProjection(nn.Module):
    """A projection (group) plus adapter slots. `modules`: the HF names of the projections whose
    outputs the base computes side by side, e.g. ["q_proj", "k_proj", "v_proj"]."""

    def __init__(self, base: nn.Module, modules: list[str], in_features: int, out_sizes: list[int],
                 max_loras: int, max_rank: int, batch: LoRABatch, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base = base
        self.modules_names = modules
        self.out_sizes = out_sizes
        self.max_rank = max_rank
        self.batch = batch
        width = len(modules) * max_rank
        self.register_buffer("lora_a", torch.zeros(max_loras, width, in_features, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(max_loras, sum(out_sizes), width, dtype=dtype, device=device))

    @torch.no_grad()
    def set_slot(self, slot: int, updates: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fill a slot: {module: (A [r, in], B scaled [out, r])}; modules not given stay zero."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        out_start = 0
        for part, (module, out) in enumerate(zip(self.modules_names, self.out_sizes)):
            if module in updates:
                a, b = updates[module]
                r, col = a.shape[0], part * self.max_rank
                self.lora_a[slot, col:col + r].copy_(a)
                self.lora_b[slot, out_start:out_start + out, col:col + r].copy_(b)
            out_start += out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.batch.groups:
            y = apply_lora(x, y, self.lora_a, self.lora_b, self.batch.groups)
        return y


# (attribute of the layer's submodule, HF module names it computes)
LORA_GROUPS = (("self_attn", "qkv_proj", ["q_proj", "k_proj", "v_proj"]), ("self_attn", "o_proj", ["o_proj"]),
               ("mlp", "gate_up_proj", ["gate_proj", "up_proj"]), ("mlp", "down_proj", ["down_proj"]))


def unwrap(module: nn.Module) -> nn.Module:
    """The base projection under a LoRA wrapper (or the module itself)."""
    return module.base if isinstance(module, LoRAProjection) else module


def install_lora(model: nn.Module, max_loras: int, max_rank: int) -> tuple[LoRABatch, list[list[LoRAProjection]]]:
    """Wrap every layer's projections (after fuse_projections); returns the shared batch state and
    the wrappers per layer, in LORA_GROUPS order."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    h, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    batch = LoRABatch()
    wrappers: list[list[LoRAProjection]] = []
    for layer in model.model.layers:
        per_layer = []
        for parent_name, attr, modules in LORA_GROUPS:
            parent = getattr(layer, parent_name)
            wrapper = LoRAProjection(getattr(parent, attr), modules, shapes[modules[0]][1],
                                     [shapes[m][0] for m in modules], max_loras, max_rank, batch, dtype, device)
            setattr(parent, attr, wrapper)
            per_layer.append(wrapper)
        wrappers.append(per_layer)
    return batch, wrappers
