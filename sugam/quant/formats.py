"""In-memory weight formats that PyTorch's CPU kernels multiply directly.

Measured on the 2-core Zen4 (benchmarks/linear.py): for one decoding token, `_weight_int8pack_mm`
reads int8 weights at the machine's full bandwidth (~31 GB/s, 2.4x faster than bf16 F.linear) and
`_weight_int4pack_mm_for_cpu` reads int4 ones ~4x faster than bf16. Both take bf16 activations;
their fp32 variants are 15-40x slower, so quantized models compute in bf16.

- Int8Weight: symmetric, one scale per output row: w[n, k] = q[n, k] * scale[n].
- Int4Weight: asymmetric, one scale and offset per group of 32 inputs of a row (tinygemm form):
  w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n], g = k // 32, codes 0..15 packed by
  `_convert_weight_to_int4pack_for_cpu` (blocks of 64 rows: byte [k, i] holds row i in its low
  nibble and row 32 + i in its high one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_GROUP = 32
INT4_ROW_BLOCK = 64  # rows interleaved by the CPU int4 packing


@dataclass
class Int8Weight:
    q: torch.Tensor        # int8 [out, in]
    scale: torch.Tensor    # bf16 [out]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.to(torch.float32) * self.scale.to(torch.float32)[:, None]).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"q": self.q, "scale": self.scale}


@dataclass
class Int4Weight:
    packed: torch.Tensor        # uint8 [out, in // 2], CPU int4pack layout
    scales_zeros: torch.Tensor  # bf16 [in // group, out, 2]
    group: int = INT4_GROUP

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def codes(self) -> torch.Tensor:
        """The 4-bit codes as uint8 [out, in], undoing the CPU packing."""
        n, k = self.shape
        blocks = self.packed.view(n // INT4_ROW_BLOCK, k, INT4_ROW_BLOCK // 2)
        halves = torch.stack([blocks & 15, blocks >> 4], dim=1)  # [row blocks, 2, in, 32]
        return halves.transpose(2, 3).reshape(n, k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        sz = self.scales_zeros.to(torch.float32)
        scale = sz[..., 0].t().repeat_interleave(self.group, dim=1)  # [out, in]
        zero = sz[..., 1].t().repeat_interleave(self.group, dim=1)
        return ((self.codes().to(torch.float32) - 8) * scale + zero).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scales_zeros": self.scales_zeros}


@dataclass
class GGUFRows:
    """A GGUF matrix kept as its own blocks, for row lookups only (token embeddings): each lookup
    dequantizes just the rows asked for with the reference kernels, so the values are exact and the
    memory is the file's."""
    raw: torch.Tensor      # uint8 [rows, bytes_per_row]
    qtype: str             # GGML type name, e.g. "Q5_0"
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.raw.shape[0], self.cols

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        picked = self.raw[ids.reshape(-1).cpu()].numpy()
        values = dequantize(picked, GGMLQuantizationType[self.qtype]).reshape(*ids.shape, self.cols)
        return torch.from_numpy(values)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"raw": self.raw}


@dataclass
class PackedGGUFWeight:
    """A GGUF matrix in the row layout of sugam's own CPU kernels (sugam/native/gguf_matmul.cpp): the
    file's codes and scales rearranged, as many bytes as the file, values exactly the reference's."""
    packed: torch.Tensor   # uint8 [out, packed_row_bytes(qtype, cols)]
    qtype: str             # GGML type name, e.g. "Q5_0"
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.cols

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from .. import native

        out = torch.empty(self.shape, dtype=torch.float32 if dtype != torch.bfloat16 else dtype)
        return native.gguf_dequantize(self.packed.cpu(), self.qtype, self.cols, out).to(device=self.packed.device, dtype=dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed}


QuantizedWeight = Int8Weight | Int4Weight | PackedGGUFWeight


def stored_bytes(fmt: str, shape: tuple[int, int]) -> int:
    """Bytes a matrix takes in memory as "int8" or "int4" (scales included)."""
    n, k = shape
    if fmt == "int8":
        return n * k + n * 2                          # codes + one bf16 scale per row
    return n * k // 2 + n * (k // INT4_GROUP) * 4     # 4-bit codes + bf16 scale and zero per group


def int4_supported(shape: tuple[int, ...], group: int = INT4_GROUP) -> bool:
    """The CPU int4 packing needs whole 64-row blocks and whole groups."""
    return len(shape) == 2 and shape[0] % INT4_ROW_BLOCK == 0 and shape[1] % group == 0


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Round each output row to int8 with its own scale (max |w| / 127)."""
    w = weight.to(torch.float32)
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    scale = scale.to(torch.bfloat16)  # the kernel's scale type: round first, then quantize against it
    q = torch.round(w / scale.to(torch.float32)[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q.contiguous(), scale)


def pack_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int = INT4_GROUP,
              rows_per_chunk: int = 8192) -> Int4Weight:
    """codes uint8/int [out, in] in 0..15; scale, zero [out, in // group]: w = (q - 8) * scale + zero."""
    n, k = codes.shape
    if not int4_supported((n, k), group):
        raise ValueError(f"int4 needs rows % {INT4_ROW_BLOCK} == 0 and columns % {group} == 0, got {n}x{k}")
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    # Pack in row chunks (whole 64-row blocks) so that the int32 codes the packer wants stay small.
    for start in range(0, n, rows_per_chunk):
        end = min(n, start + rows_per_chunk)
        packed[start:end] = torch._convert_weight_to_int4pack_for_cpu(codes[start:end].to(torch.int32), 1)
    scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return Int4Weight(packed, scales_zeros, group)


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> Int4Weight:
    """Asymmetric min/max quantization of each group of `group` inputs to 16 levels."""
    n, k = weight.shape
    w = weight.to(torch.float32).view(n, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    # Round scale and offset to the kernel's bf16 first, then pick codes against the rounded values.
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16).to(torch.float32)
    zero = (lo + 8 * scale).to(torch.bfloat16).to(torch.float32)  # the value of code 8
    codes = torch.round((w - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15).to(torch.uint8)
    return pack_int4(codes.view(n, k), scale, zero, group)


def quantize(weight: torch.Tensor, fmt: str, rows_per_chunk: int = 8192) -> QuantizedWeight:
    """Quantize a dense matrix to "int8" or "int4", a row chunk at a time (bounded float temporaries)."""
    if fmt not in ("int8", "int4"):
        raise ValueError(f"unknown weight format {fmt!r}")
    out = RowWriter(fmt, tuple(weight.shape))
    for start in range(0, weight.shape[0], rows_per_chunk):
        part = weight[start:start + rows_per_chunk]
        out.write(start, quantize_int4(part) if fmt == "int4" else quantize_int8(part))
    return out.result


class RowWriter:
    """Assembles a quantized matrix from row chunks in place (no second copy from concatenating)."""

    def __init__(self, fmt: str, shape: tuple[int, int], group: int = INT4_GROUP):
        n, k = shape
        if fmt == "int8":
            self.result: QuantizedWeight = Int8Weight(torch.empty(n, k, dtype=torch.int8),
                                                      torch.empty(n, dtype=torch.bfloat16))
        else:
            self.result = Int4Weight(torch.empty(n, k // 2, dtype=torch.uint8),
                                     torch.empty(k // group, n, 2, dtype=torch.bfloat16), group)

    def write(self, start: int, chunk: QuantizedWeight) -> None:
        rows = chunk.shape[0]
        if isinstance(self.result, Int8Weight):
            self.result.q[start:start + rows] = chunk.q
            self.result.scale[start:start + rows] = chunk.scale
        else:
            self.result.packed[start:start + rows] = chunk.packed
            self.result.scales_zeros[:, start:start + rows] = chunk.scales_zeros
