"""Projections of one input that run together (q|k|v, gate|up), in as few matrices as their
weight formats allow.

After loading, a layer hands its separate projections to `ProjectionGroup`, which concatenates
them into one matrix where all share a format (one matmul instead of three), else q|k and v, else
keeps them apart. Callers always get the outputs concatenated in the original order, so the layer
code has one path whatever the files held; `parts` are the matrices as stored, for the native
decoder (and, later, LoRA and tensor parallelism).
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.linear import QuantizedLinear, fuse_linears


class ProjectionGroup(nn.Module):
    def __init__(self, projections: list[nn.Linear | QuantizedLinear]):
        super().__init__()
        self.out_sizes = [int(p.out_features) for p in projections]
        parts: list[nn.Module] | None = None
        fused = fuse_linears(projections)
        if fused is not None:
            parts = [fused]
        elif len(projections) == 3:  # q|k share a format more often than v does (Q4_K_M files)
            first_two = fuse_linears(projections[:2])
            if first_two is not None:
                parts = [first_two, projections[2]]
        self.parts = nn.ModuleList(parts or projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The projections' outputs, concatenated along the last dimension."""
        if len(self.parts) == 1:
            return self.parts[0](x)
        return torch.cat([p(x) for p in self.parts], dim=-1)
