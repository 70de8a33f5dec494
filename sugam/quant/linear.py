"""nn.Linear / nn.Embedding stand-ins whose weights stay int8 or int4.

Small batches (decode) call PyTorch's weight-only kernels, which read the quantized bytes directly.
Large ones (prefill) are compute-bound: the weight is dequantized into a reused bf16 buffer and
multiplied by the bf16 GEMM, which is 2-3x faster there (benchmarks/linear.py):

    tokens      1     8     32    64    512      (µs, 896x4864, 2 threads)
    bf16       317   453   819  1075   5259
    int8pack   132   281  1364  2351  14072
    int4pack    81   259  1025  2330  15644
    int8 deq.+bf16 GEMM         1711   5929

Other devices than the CPU dequantize the weight for every call: correct, not fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .formats import Int4Weight, Int8Weight, QuantizedWeight

# Up to this many rows the weight-only kernels win; above it, dequantize + GEMM.
KERNEL_MAX_ROWS = 32


class _DequantBuffer:
    """One bf16 buffer per device, grown to the largest weight, reused by every layer.

    Fresh multi-MB allocations page-fault at ~3.5 GB/s on this CPU; a reused buffer does not.
    The engine runs one forward at a time, so layers never need it at once.
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def get(self, numel: int, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=torch.bfloat16, device=device)
            self._buffers[device] = buf
        return buf[:numel]


_dequant_buffer = _DequantBuffer()


def _dequantize_into(weight: QuantizedWeight, device: torch.device) -> torch.Tensor:
    n, k = weight.shape
    out = _dequant_buffer.get(n * k, device).view(n, k)
    if isinstance(weight, Int8Weight):
        return torch.mul(weight.q, weight.scale[:, None], out=out)
    out.copy_(weight.dequantize(torch.bfloat16))
    return out


def quantized_matmul(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x [rows, in] -> [rows, out] in x's dtype (computed in bf16)."""
    dtype = x.dtype
    xb = x.to(torch.bfloat16)
    if x.device.type != "cpu":
        return F.linear(xb, weight.dequantize(torch.bfloat16)).to(dtype)
    if x.shape[0] > KERNEL_MAX_ROWS:
        return F.linear(xb, _dequantize_into(weight, x.device)).to(dtype)
    if isinstance(weight, Int8Weight):
        out = torch._weight_int8pack_mm(xb, weight.q, weight.scale)
    else:
        out = torch._weight_int4pack_mm_for_cpu(xb, weight.packed, weight.group, weight.scales_zeros)
    return out.to(dtype)


class QuantizedLinear(nn.Module):
    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_format = "int8" if isinstance(weight, Int8Weight) else "int4"
        for name, tensor in weight.tensors().items():
            self.register_buffer(name, tensor)
        self.group = getattr(weight, "group", 0)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        if self.weight_format == "int8":
            return Int8Weight(self.q, self.scale)
        return Int4Weight(self.packed, self.scales_zeros, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = quantized_matmul(flat, self.quantized_weight)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weight_format}"


class QuantizedEmbedding(nn.Module):
    """Token embedding stored as int8 rows (the row lookup dequantizes only the rows asked for)."""

    def __init__(self, weight: Int8Weight, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("q", weight.q)
        self.register_buffer("scale", weight.scale)
        self.dtype = dtype

    @property
    def quantized_weight(self) -> Int8Weight:
        return Int8Weight(self.q, self.scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.q[ids].to(torch.float32) * self.scale[ids].to(torch.float32)[..., None]).to(self.dtype)
