"""RMSNorm, computed in float32 whatever the activation dtype (as the reference does).

bf16 and fp32 on CPUs that run sugam's kernels take one native call (sugam/native/layers.cpp) instead
of ~8 PyTorch ops, twice a layer: the very function the native decoder calls, so a token computed by
either path gets the same bits (batch invariance needs that)."""

from __future__ import annotations

import torch
from torch import nn

from .. import native

# Activation dtypes sugam's native layer ops take.
NATIVE_DTYPES = (torch.bfloat16, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in NATIVE_DTYPES and x.is_cpu and x.shape[-1] % 16 == 0 and native.available():
            return native.rms_norm(x.contiguous(), self.weight, self.eps)  # one call, same math
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
