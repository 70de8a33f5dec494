"""nn.Linear / nn.Embedding stand-ins whose weights stay int8 or int4.

Small batches (decode) call PyTorch's weight-only kernels, which read the quantized bytes directly.
Large ones (prefill) are compute-bound: the weight is dequantized into a reused bf16 buffer and
multiplied by the bf16 GEMM, which is 2-3x faster there (benchmarks/linear.py):

    tokens      1     8     32    64    512      (µs, 896x4864, 2 threads)
    bf16       317   453   819  1075   5259
    int8pack   132   281  1364  2351  14072
    int4pack    81   259  1025  2330  15644

The kernels cost grows linearly with the rows (they are GEMV kernels). Dequantizing the whole
Qwen2.5-0.5B body takes ~40 ms (int8 ~18 G weights/s: one conversion pass, the row scale applied
to the product; int4 ~2.6 G weights/s), so the switch sits at 32 rows.

Which path a row takes changes its last bits (the kernels give a row the same result whatever the
batch size; the GEMM's blocking, and so its sums, change with the number of rows). Seeded requests
therefore compute their whole prompt (engine/block_manager.py), so that they repeat exactly. With
batch invariance on (EngineConfig.batch_invariant) the engine names the kind of each step
(`rows_path`): decode rows always take the kernels, prompt rows always the GEMM in padded tiles of
INVARIANT_TILE_ROWS, so a row's bits never depend on what else is in the batch.

Other devices than the CPU dequantize the weight for every call: correct, not fast.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from .formats import (
    INT4_ROW_BLOCK,
    GGUFRows,
    Int4Weight,
    Int8Weight,
    PackedGGUFWeight,
    QuantizedWeight,
    known_int4_layout,
)

# Up to this many rows the weight-only kernels win; above it, dequantize + GEMM.
KERNEL_MAX_ROWS = 32
# The same switch for sugam's packed-GGUF kernels, by their build (sugam.native.isa()). AVX-512: every
# body matmul of the 0.5B / 1.5B at 2 threads, kernels vs dequantize + bf16 GEMM, 16 rows 66 vs 88 /
# 188 vs 235 ms, 24 rows 104 vs 115 / 271 vs 265, 32 rows 138 vs 130 / 354 vs 293 (their cost grows
# with each row; the GEMM's barely): 16 keeps a clear margin. The portable kernels (tiled int8 GEMM)
# against dequantize + fp32 GEMM, both in AVX2, one layer at 2 threads (benchmarks/packed_gemm.py):
# 0.5B 0.61 / 1.01 / 0.88-1.06 / 1.25 of the GEMM's time at 32 / 64 / 128 / 256 rows, 1.5B 0.55 /
# 0.69 / 0.91 / 1.24: the kernels up to 128 rows.
AVX512_MAX_ROWS = 16
# Where the CPU lacks bf16 arithmetic the GEMM computes in fp32, at about half the speed, while the
# kernels are int8 either way: on an Ice Lake Xeon (AVX-512 VNNI, no BF16), one layer at 2 threads,
# kernels / GEMM time 0.49 / 0.93 / 1.11 (0.5B) and 0.37 / 0.64 / 1.09 (1.5B) at 16 / 32 / 64 rows.
AVX512_FP32_MAX_ROWS = 48
PORTABLE_MAX_ROWS = 128


@functools.cache
def packed_kernel_max_rows(dtype: torch.dtype = torch.bfloat16) -> int:
    """Up to this many rows of `dtype` activations a packed GGUF matrix is multiplied by sugam's
    kernels, above by its GEMM (SUGAM_PACKED_KERNEL_MAX_ROWS overrides: e.g. a large value sends
    prompts through the kernels too)."""
    override = os.environ.get("SUGAM_PACKED_KERNEL_MAX_ROWS", "").strip()
    if override:
        return int(override)
    if native.isa() != "avx512":
        return PORTABLE_MAX_ROWS
    return AVX512_MAX_ROWS if dtype == torch.bfloat16 else AVX512_FP32_MAX_ROWS


# Batch invariance: the path every row of the current step takes (None: chosen by the number of rows).
_rows_path: ContextVar[str | None] = ContextVar("sugam_rows_path", default=None)
# Prompt rows go through the GEMM in tiles of this many rows, the last one padded: a GEMM of a fixed
# shape sums each row the same way wherever it sits in the tile, while its blocking changes with the
# number of rows. Measured with rows permuted (tests/test_batch_invariance.py checks it on each machine):
# tiles of 32 and 64 keep every row's bits for fp32 and bf16 at 1 and 2 threads, 128 does not; 64 rows
# prefill 1.5x faster than 32 (fp32, Ice Lake).
INVARIANT_TILE_ROWS = 64


@contextlib.contextmanager
def rows_path(path: str | None) -> Iterator[None]:
    """Within the block, quantized matmuls send every row to "kernels" or to the "gemm" in fixed
    tiles (None: by the number of rows, the fastest)."""
    if path not in (None, "kernels", "gemm"):
        raise ValueError(f"rows_path: {path!r}")
    token = _rows_path.set(path)
    try:
        yield
    finally:
        _rows_path.reset(token)


def _in_tiles(x: torch.Tensor, gemm) -> torch.Tensor:
    """gemm(x) with x padded by zero rows to whole INVARIANT_TILE_ROWS tiles (the GEMMs then multiply
    tile by tile, _matmul_rows), the padding's rows dropped from the result."""
    rows, tile = x.shape[0], INVARIANT_TILE_ROWS
    if rows % tile:
        x = torch.cat([x, x.new_zeros(tile - rows % tile, x.shape[1])])
    return gemm(x)[:rows]


def _matmul_rows(x: torch.Tensor, w_t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w_t (into `out`): at once, or under batch invariance one fixed tile of rows at a time."""
    if _rows_path.get() != "gemm":
        return torch.matmul(x, w_t, out=out)
    if out is None:
        out = x.new_empty(x.shape[0], w_t.shape[1])
    for start in range(0, x.shape[0], INVARIANT_TILE_ROWS):
        torch.matmul(x[start:start + INVARIANT_TILE_ROWS], w_t, out=out[start:start + INVARIANT_TILE_ROWS])
    return out


# Larger matrices (the LM head) are dequantized and multiplied this many values at a time.
DEQUANT_CHUNK_VALUES = 16 << 20


class _DequantBuffer:
    """One buffer per device and dtype, grown to the largest chunk, reused by every layer.

    Fresh multi-MB allocations page-fault at ~3.5 GB/s on this CPU; a reused buffer does not.
    The engine runs one forward at a time, so layers never need it at once.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, numel: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        buf = self._buffers.get((device, dtype))
        if buf is None or buf.numel() < numel:
            # A normal tensor even when first asked for under inference_mode: an inference tensor
            # could not be written by a later call made outside it.
            with torch.inference_mode(False):
                buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[(device, dtype)] = buf
        return buf[:numel]


_dequant_buffer = _DequantBuffer()


def _dequantized_transpose(weight: Int8Weight | Int4Weight, dtype: torch.dtype,
                           device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W^T [in, out] in `dtype`, per-output scale to apply to x @ W^T or None), written into the shared
    buffer (valid until the next call)."""
    n, k = weight.shape
    # int4 also needs room for its centred codes (half the weight) after the weight itself
    scratch = _dequant_buffer.get(n * k + (n * k // 2 if isinstance(weight, Int4Weight) else 0), device, dtype)
    buf = scratch[:n * k]
    if isinstance(weight, Int8Weight):
        # The codes are exact in bf16 and the scale is per output, so it is applied to the product
        # instead: one conversion pass over the weight (3x faster than a mixed-dtype multiply).
        return buf.view(n, k).copy_(weight.q).t(), weight.scale.to(dtype)
    # int4: the packed bytes are [row blocks, in, block / 2], each byte two rows of a block (int4_layout),
    # so W^T's memory order [in, row block, rows of the block] reads them in sequence (6x faster than
    # unpacking to W [out, in]). Operands of one dtype keep every op on its fast path (mixed dtypes or
    # broadcasts of another dtype are 3-4x slower); codes - 8 and the bf16 scale and zero are exact in
    # bf16 and fp32, so only the result is rounded, as in the kernel.
    layout = known_int4_layout()
    b, groups = layout.block_rows, k // weight.group
    blocks, half = n // b, b // 2
    packed = weight.packed.view(blocks, groups, weight.group, half)
    sz = weight.scales_zeros
    if layout.adjacent:  # row = block * b + 2 * byte + nibble
        dest = buf.view(groups, weight.group, blocks, half, 2).permute(2, 4, 0, 1, 3)
        per_group = sz.view(groups, blocks, half, 2, 2).permute(1, 3, 0, 2, 4)
    else:  # row = block * b + nibble * half + byte
        dest = buf.view(groups, weight.group, blocks, 2, half).permute(2, 3, 0, 1, 4)
        per_group = sz.view(groups, blocks, 2, half, 2).permute(1, 2, 0, 3, 4)
    # [blocks, nibble, groups, 1, half], contiguous: a strided inner dimension would defeat vectorization
    scale = per_group[..., 0].unsqueeze(3).to(dtype, memory_format=torch.contiguous_format)
    zero = per_group[..., 1].unsqueeze(3).to(dtype, memory_format=torch.contiguous_format)
    centred = scratch[n * k:].view(packed.shape)
    for nibble, codes in enumerate((packed & 15, packed >> 4)):
        centred.copy_(codes).sub_(8)
        torch.addcmul(zero[:, nibble], centred, scale[:, nibble], out=dest[:, nibble])
    return buf.view(k, n), None


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the dequantize + GEMM paths compute in: the model's (bf16 where the CPU has bf16
    arithmetic, else fp32: emulated bf16 GEMMs are 2-3x slower than fp32 ones on AVX2)."""
    return dtype if dtype in (torch.bfloat16, torch.float32) else torch.bfloat16


def _dequantized_matmul(x: torch.Tensor, weight: Int8Weight | Int4Weight) -> torch.Tensor:
    """x [rows, in] @ W^T for many rows, in x's dtype: the weight is dequantized into the shared buffer
    and multiplied by the GEMM, a chunk of output rows at a time (bounded buffer for any matrix)."""
    def product(part: Int8Weight | Int4Weight) -> torch.Tensor:
        transposed, out_scale = _dequantized_transpose(part, x.dtype, x.device)
        out = _matmul_rows(x, transposed)
        return out if out_scale is None else out.mul_(out_scale)

    n, k = weight.shape
    step = max(INT4_ROW_BLOCK, DEQUANT_CHUNK_VALUES // k // INT4_ROW_BLOCK * INT4_ROW_BLOCK)
    if step >= n:  # one chunk: its product is the result (no copy into a result tensor)
        return product(weight)
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for start in range(0, n, step):
        out[:, start:start + step] = product(weight.rows(start, min(n, start + step)))
    return out


def _kernel_matmul(xb: torch.Tensor, weight: Int8Weight | Int4Weight) -> torch.Tensor:
    """bf16 rows (at most KERNEL_MAX_ROWS of them) times the weight, by PyTorch's CPU kernel."""
    if isinstance(weight, Int8Weight):
        return torch._weight_int8pack_mm(xb, weight.q, weight.scale)
    return torch._weight_int4pack_mm_for_cpu(xb, weight.packed, weight.group, weight.scales_zeros)


def _packed_matmul(x: torch.Tensor, packed: torch.Tensor, qtype: str, cols: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, in] -> [rows, out] in x's dtype for a packed GGUF matrix: the kernel for up to
    packed_kernel_max_rows() rows, else dequantize + GEMM in x's dtype (bf16 or fp32), in row chunks of
    the weight (a vocabulary-sized head never needs a full copy). Takes the weight's parts, not a
    PackedGGUFWeight: decode calls it ~100 times a token."""
    path = _rows_path.get()
    if path == "kernels" or (path is None and x.shape[0] <= packed_kernel_max_rows(x.dtype)):
        return native.gguf_matmul(x, packed, qtype, cols, bias)
    if path == "gemm":
        return _in_tiles(x, lambda padded: _packed_gemm(padded, packed, qtype, cols, bias))
    return _packed_gemm(x, packed, qtype, cols, bias)


def _packed_gemm(x: torch.Tensor, packed: torch.Tensor, qtype: str, cols: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """_packed_matmul's dequantize + GEMM."""
    n = packed.shape[0]
    compute = _gemm_dtype(x.dtype)
    xc = x.to(compute)
    out = torch.empty(x.shape[0], n, dtype=compute)
    step = max(1, DEQUANT_CHUNK_VALUES // cols)
    for start in range(0, n, step):
        rows = packed[start:start + step]
        buffer = _dequant_buffer.get(rows.shape[0] * cols, x.device, compute).view(-1, cols)
        w = native.gguf_dequantize(rows, qtype, cols, buffer)
        _matmul_rows(xc, w.t(), out=out[:, start:start + rows.shape[0]])
    if bias is not None:
        out += bias
    return out.to(x.dtype)


def quantized_matmul(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x [rows, in] -> [rows, out] in x's dtype (computed in bf16, or int8 x GGUF codes)."""
    if isinstance(weight, PackedGGUFWeight):
        return _packed_matmul(x, weight.packed, weight.qtype, weight.cols)
    dtype = x.dtype
    if x.device.type != "cpu":
        return F.linear(x.to(torch.bfloat16), weight.dequantize(torch.bfloat16)).to(dtype)
    path = _rows_path.get()
    if path == "kernels":
        parts = [_kernel_matmul(rows.to(torch.bfloat16), weight) for rows in x.split(KERNEL_MAX_ROWS)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(dtype)
    if path == "gemm":
        return _in_tiles(x.to(_gemm_dtype(dtype)), lambda padded: _dequantized_matmul(padded, weight)).to(dtype)
    if x.shape[0] > KERNEL_MAX_ROWS:
        return _dequantized_matmul(x.to(_gemm_dtype(dtype)), weight).to(dtype)
    return _kernel_matmul(x.to(torch.bfloat16), weight).to(dtype)


def head_matmul(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """The LM head: few rows (one per sampling sequence) times a vocabulary-sized matrix. Always the
    kernels, 32 rows at a time: dequantizing a 150k-row head would need a buffer of its size in bf16
    (272 MB for Qwen2.5-0.5B), and the kernels give each row the same logits whatever the batch.
    (A packed GGUF head dequantizes in row chunks instead, see _packed_matmul, except with batch
    invariance on: the runner then computes logits under rows_path("kernels").)"""
    if isinstance(weight, PackedGGUFWeight):
        return _packed_matmul(x, weight.packed, weight.qtype, weight.cols)
    parts = [quantized_matmul(rows, weight) for rows in x.split(KERNEL_MAX_ROWS)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class QuantizedLinear(nn.Module):
    # The buffers of its format (weight.tensors(), registered by name): declared for type checkers.
    q: torch.Tensor
    scale: torch.Tensor
    packed: torch.Tensor
    scales_zeros: torch.Tensor

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_format = ("int8" if isinstance(weight, Int8Weight) else "int4" if isinstance(weight, Int4Weight)
                              else "packed")
        for name, tensor in weight.tensors().items():
            self.register_buffer(name, tensor)
        self.group = getattr(weight, "group", 0)
        self.qtype = getattr(weight, "qtype", "")
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        if self.weight_format == "int8":
            return Int8Weight(self.q, self.scale)
        if self.weight_format == "packed":
            return PackedGGUFWeight(self.packed, self.qtype, self.in_features)
        return Int4Weight(self.packed, self.scales_zeros, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_format == "packed":
            out = _packed_matmul(x.reshape(-1, self.in_features), self.packed, self.qtype, self.in_features, self.bias)
            return out.view(*x.shape[:-1], self.out_features)
        if (x.dim() == 2 and x.shape[0] <= KERNEL_MAX_ROWS and x.dtype == torch.bfloat16 and x.is_cpu
                and _rows_path.get() != "gemm"):
            # Decode fast path: one kernel call, no conversions (a layer runs ~100 ops per token,
            # each costing microseconds of dispatch, so the ops around the kernel matter).
            out = _kernel_matmul(x, self.quantized_weight)  # type: ignore[arg-type]  # int8 or int4 here
            return out if self.bias is None else out.add_(self.bias)
        flat = x.reshape(-1, self.in_features)
        out = quantized_matmul(flat, self.quantized_weight)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        fmt = f"{self.weight_format} {self.qtype}" if self.qtype else self.weight_format
        return f"in_features={self.in_features}, out_features={self.out_features}, {fmt}"


def fuse_linears(modules: list[Any]) -> nn.Module | None:  # nn.Linear or QuantizedLinear, read by attribute
    """One module computing the concatenated outputs of `modules` (same input), or None when they
    cannot share one matrix (different formats). Fewer, larger matmuls: less dispatch per token."""
    weight: torch.Tensor | QuantizedWeight   # the fused matrix: dense, or in the parts' format
    if all(type(m) is nn.Linear for m in modules):
        weight = torch.cat([m.weight for m in modules])
        has_bias = [m.bias is not None for m in modules]
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=any(has_bias),
                          device=weight.device, dtype=weight.dtype)
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if any(has_bias):
            fused.bias = nn.Parameter(torch.cat([m.bias if m.bias is not None else
                                                 torch.zeros(m.out_features, dtype=weight.dtype, device=weight.device)
                                                 for m in modules]), requires_grad=False)
        return fused
    if not all(isinstance(m, QuantizedLinear) for m in modules):
        return None
    first = modules[0]
    if any(m.weight_format != first.weight_format or m.group != first.group or m.qtype != first.qtype
           for m in modules):
        return None
    if first.weight_format == "packed":
        weight = PackedGGUFWeight(torch.cat([m.packed for m in modules]), first.qtype, first.in_features)
    elif first.weight_format == "int8":
        weight = Int8Weight(torch.cat([m.q for m in modules]), torch.cat([m.scale for m in modules]))
    else:  # each part is whole 64-row blocks, so the packed rows simply stack
        weight = Int4Weight(torch.cat([m.packed for m in modules]),
                            torch.cat([m.scales_zeros for m in modules], dim=1), first.group)
    biases = [m.bias for m in modules]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else torch.zeros(m.out_features, dtype=biases[0].dtype)
                          for b, m in zip(biases, modules)])
    return QuantizedLinear(weight, bias)


class QuantizedEmbedding(nn.Module):
    """Token embedding stored as int8 rows (the row lookup dequantizes only the rows asked for)."""

    q: torch.Tensor   # buffers: declared for type checkers
    scale: torch.Tensor

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


class GGUFRowEmbedding(nn.Module):
    """Token embedding left in the GGUF file's own blocks (exact, and as small as the file)."""

    raw: torch.Tensor   # a buffer: declared for type checkers

    def __init__(self, weight: GGUFRows, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("raw", weight.raw)
        self.qtype, self.cols, self.dtype = weight.qtype, weight.cols, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return GGUFRows(self.raw, self.qtype, self.cols).rows(ids).to(device=ids.device, dtype=self.dtype)
