"""Many LoRA adapters over one copy of the base weights, in the same batch.

Each projection group of a layer (q|k|v, o, gate|up, down) is wrapped by a `LoRAProjection` that
holds `max_loras` adapter slots: A stacked as [slots, max_rank * parts, in] and B transposed and
already scaled as Bt [slots, max_rank * parts, out]. Columns are rank-major (column k * parts + p
is rank k of part p, e.g. of q, k or v), so an adapter of rank r uses only the first r * parts of
them; a module an adapter skips stays zero. A step's rows are grouped by slot (`LoRABatch`, shared
by every wrapper of the model); per group the update is a shrink to the rank and an expand to the
outputs, added onto the unchanged, possibly quantized, base product. Rows of the base model
belong to no group and cost nothing.

On a CPU with sugam's kernels the update is one native call (sugam/native/lora.cpp), which the
native decoder (models/native_decode.py) makes too, so both paths give identical results;
elsewhere it is two PyTorch matmuls per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import native

if TYPE_CHECKING:
    from ..models.qwen2 import CausalLM

# One adapter of a step: (slot, row indices or None for all rows, the adapter's rank)
LoRAGroup = tuple[int, "torch.Tensor | None", int]


@dataclass
class LoRABatch:
    """Which rows of this step use which slot, shared by every LoRAProjection of a model."""
    groups: list[LoRAGroup] = field(default_factory=list)
    native: bool = False        # the update runs as sugam/native/lora.cpp


def apply_lora(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor,
               groups: list[LoRAGroup], parts: int) -> torch.Tensor:
    """y [rows, out] += (x A_slot^T) Bt_slot for each group's rows, in place (PyTorch ops)."""
    for slot, rows, rank in groups:
        xs = x if rows is None else x.index_select(0, rows)
        width = rank * parts
        delta = torch.matmul(torch.matmul(xs, lora_a[slot, :width].t()), lora_bt[slot, :width])
        if rows is None:
            y.add_(delta)
        else:
            y.index_add_(0, rows, delta)
    return y


class LoRAProjection(nn.Module):
    """A projection (group) plus adapter slots. `modules`: the HF names of the projections whose
    outputs the base computes side by side, e.g. ["q_proj", "k_proj", "v_proj"]."""

    lora_a: torch.Tensor   # buffers (register_buffer): declared for type checkers
    lora_b: torch.Tensor

    def __init__(self, base: nn.Module, modules: list[str], in_features: int, out_sizes: list[int],
                 max_loras: int, max_rank: int, batch: LoRABatch, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base = base
        self.modules_names = modules
        self.out_sizes = out_sizes
        self.max_rank = max_rank
        self.batch = batch
        self.parts = len(modules)
        width = self.parts * max_rank
        self.register_buffer("lora_a", torch.zeros(max_loras, width, in_features, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(max_loras, width, sum(out_sizes), dtype=dtype, device=device))

    @torch.no_grad()
    def set_slot(self, slot: int, updates: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fill a slot: {module: (A [r, in], B scaled [out, r])}; modules not given stay zero."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        out_start = 0
        for part, (module, out) in enumerate(zip(self.modules_names, self.out_sizes)):
            if module in updates:
                a, b = updates[module]
                r = a.shape[0]
                self.lora_a[slot, part:r * self.parts:self.parts].copy_(a)
                self.lora_b[slot, part:r * self.parts:self.parts, out_start:out_start + out].copy_(b.t())
            out_start += out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        groups = self.batch.groups
        if groups:
            if self.batch.native:
                native.lora_add(y, x, self.lora_a, self.lora_b, groups, self.max_rank)
            else:
                y = apply_lora(x, y, self.lora_a, self.lora_b, groups, self.parts)
        return y


# (attribute of the layer's submodule, HF module names it computes)
LORA_GROUPS = (("self_attn", "qkv_proj", ["q_proj", "k_proj", "v_proj"]), ("self_attn", "o_proj", ["o_proj"]),
               ("mlp", "gate_up_proj", ["gate_proj", "up_proj"]), ("mlp", "down_proj", ["down_proj"]))


def unwrap(module: nn.Module) -> nn.Module:
    """The base projection under a LoRA wrapper (or the module itself)."""
    return module.base if isinstance(module, LoRAProjection) else module


def install_lora(model: CausalLM, max_loras: int, max_rank: int) -> tuple[LoRABatch, list[list[LoRAProjection]]]:
    """Wrap every layer's projections (after fuse_projections); returns the shared batch state and
    the wrappers per layer, in LORA_GROUPS order."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    h, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    batch = LoRABatch(native=device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and native.available())
    wrappers: list[list[LoRAProjection]] = []
    for layer in model.model.layers:
        per_layer = []
        for parent_name, attr, modules in LORA_GROUPS:
            parent = getattr(layer, parent_name)
            if not hasattr(parent, attr):
                continue  # a mixture-of-experts layer's MLP: its experts take no LoRA (lora/adapter.py refuses it)
            wrapper = LoRAProjection(getattr(parent, attr), modules, shapes[modules[0]][1],
                                     [shapes[m][0] for m in modules], max_loras, max_rank, batch, dtype, device)
            setattr(parent, attr, wrapper)
            per_layer.append(wrapper)
        wrappers.append(per_layer)
    return batch, wrappers
