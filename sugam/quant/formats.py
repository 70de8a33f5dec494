"""In-memory weight formats that PyTorch's CPU kernels multiply directly.

Measured on the 2-core Zen4 (benchmarks/linear.py): for one decoding token, `_weight_int8pack_mm`
reads int8 weights at the machine's full bandwidth (~31 GB/s, 2.4x faster than bf16 F.linear) and
`_weight_int4pack_mm_for_cpu` reads int4 ones ~4x faster than bf16. Both take bf16 activations;
their fp32 variants are 15-40x slower (also with ATen's AVX2 kernels), so the kernels are always
given bf16 rows, whatever the model computes in.

- Int8Weight: symmetric, one scale per output row: w[n, k] = q[n, k] * scale[n].
- Int4Weight: asymmetric, one scale and offset per group of 32 inputs of a row (tinygemm form):
  w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n], g = k // 32, codes 0..15 packed by
  `_convert_weight_to_int4pack_for_cpu`. That packing depends on the CPU capability ATen runs
  with (see Int4Layout), so the packed bytes are only read through the layout detected here, and
  are never saved: `sugam quantize` stores the plain codes (`pack_codes`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache

import torch

log = logging.getLogger(__name__)

INT4_GROUP = 32
INT4_ROW_BLOCK = 64  # int4 matrices have whole blocks of 64 rows: a multiple of every packing's block


@dataclass(frozen=True)
class Int4Layout:
    """How `torch._convert_weight_to_int4pack_for_cpu` arranges the codes on this CPU.

    Rows go in blocks of `block_rows`; a block is stored as [in, block_rows / 2] bytes. With
    `adjacent`, byte i of a column holds rows 2i (low nibble) and 2i + 1 (high); otherwise rows i
    and i + block_rows / 2. Seen in PyTorch 2.13: AVX512 64 rows halves, AVX2 32 rows halves,
    DEFAULT (and builds without x86 vector kernels) 32 rows adjacent.
    """
    block_rows: int
    adjacent: bool

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 codes [out, in] -> packed bytes [out, in // 2] in this layout (the kernel's own packer
        is used for real weights; this one states the layout, for the probe and the tests)."""
        n, k = codes.shape
        half = self.block_rows // 2
        blocks = codes.to(torch.uint8).view(n // self.block_rows, self.block_rows, k)
        if self.adjacent:
            low, high = blocks[:, 0::2], blocks[:, 1::2]
        else:
            low, high = blocks[:, :half], blocks[:, half:]
        return (low | (high << 4)).transpose(1, 2).reshape(n, k // 2)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed bytes [out, in // 2] -> uint8 codes [out, in]."""
        n, k = packed.shape[0], packed.shape[1] * 2
        blocks = packed.view(n // self.block_rows, k, self.block_rows // 2)
        halves = torch.stack([blocks & 15, blocks >> 4], dim=3 if self.adjacent else 1)
        # adjacent: [blocks, in, byte, nibble] ; halves: [blocks, nibble, in, byte]
        order = (0, 2, 3, 1) if self.adjacent else (0, 1, 3, 2)
        return halves.permute(order).reshape(n, k)


_KNOWN_LAYOUTS = [Int4Layout(64, False), Int4Layout(32, False), Int4Layout(32, True), Int4Layout(16, True),
                  Int4Layout(16, False), Int4Layout(64, True)]


@cache
def int4_layout() -> Int4Layout | None:
    """The packing of this process's ATen kernels, found by packing a probe (None: unknown, so int4 is
    not used). Every row and column gets a distinct code pattern, so only the true layout matches."""
    rows, cols = INT4_ROW_BLOCK, 64
    r = torch.arange(rows)[:, None].expand(rows, cols)
    c = torch.arange(cols)[None, :].expand(rows, cols)
    probes = [r % 16, r // 16, c % 16, c // 16]
    try:
        packed = [torch._convert_weight_to_int4pack_for_cpu(p.to(torch.int32).contiguous(), 1) for p in probes]
    except (RuntimeError, AttributeError) as exc:  # an old PyTorch or a build without the kernel
        log.warning("PyTorch's CPU int4 kernel is unavailable (%s); int4 weights are stored as int8", exc)
        return None
    for layout in _KNOWN_LAYOUTS:
        if all(got.shape == (rows, cols // 2) and torch.equal(got, layout.pack(p)) for got, p in zip(packed, probes)):
            return layout
    log.warning("unknown packing of PyTorch's CPU int4 kernel (capability %s); int4 weights are stored as int8",
                torch.backends.cpu.get_cpu_capability())
    return None


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [out, in] -> [out, in // 2], column 2j in the low nibble of byte j and 2j + 1 in the
    high one: the CPU-independent form `sugam quantize` stores."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


@dataclass
class Int8Weight:
    q: torch.Tensor        # int8 [out, in]
    scale: torch.Tensor    # bf16 [out]

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.to(torch.float32) * self.scale.to(torch.float32)[:, None]).to(dtype)

    def rows(self, start: int, end: int) -> Int8Weight:
        return Int8Weight(self.q[start:end], self.scale[start:end])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"q": self.q, "scale": self.scale}


@dataclass
class Int4Weight:
    packed: torch.Tensor        # uint8 [out, in // 2], in this CPU's int4_layout()
    scales_zeros: torch.Tensor  # bf16 [in // group, out, 2]
    group: int = INT4_GROUP

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def codes(self) -> torch.Tensor:
        """The 4-bit codes as uint8 [out, in], undoing this CPU's packing."""
        return known_int4_layout().unpack(self.packed)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        sz = self.scales_zeros.to(torch.float32)
        scale = sz[..., 0].t().repeat_interleave(self.group, dim=1)  # [out, in]
        zero = sz[..., 1].t().repeat_interleave(self.group, dim=1)
        return ((self.codes().to(torch.float32) - 8) * scale + zero).to(dtype)

    def rows(self, start: int, end: int) -> Int4Weight:
        """Output rows start:end (whole 64-row blocks), sharing memory where the layout allows."""
        return Int4Weight(self.packed[start:end], self.scales_zeros[:, start:end], self.group)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scales_zeros": self.scales_zeros}


def known_int4_layout() -> Int4Layout:
    """int4_layout() where an Int4Weight exists (never None there)."""
    layout = int4_layout()
    if layout is None:  # int4_supported() keeps every Int4Weight from being made on such a CPU
        raise RuntimeError("PyTorch's int4 packing is unknown on this CPU")
    return layout


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
    """PyTorch's int4 kernel runs here with a known packing, and the shape has whole 64-row blocks
    and whole groups."""
    return (len(shape) == 2 and shape[0] % INT4_ROW_BLOCK == 0 and shape[1] % group == 0
            and int4_layout() is not None)


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


def quantize(weight: torch.Tensor, fmt: str, rows_per_chunk: int = 8192) -> Int8Weight | Int4Weight:
    """Quantize a dense matrix to "int8" or "int4", a row chunk at a time (bounded float temporaries)."""
    if fmt not in ("int8", "int4"):
        raise ValueError(f"unknown weight format {fmt!r}")
    out = RowWriter(fmt, (weight.shape[0], weight.shape[1]))
    for start in range(0, weight.shape[0], rows_per_chunk):
        part = weight[start:start + rows_per_chunk]
        out.write(start, quantize_int4(part) if fmt == "int4" else quantize_int8(part))
    return out.result


class RowWriter:
    """Assembles a quantized matrix from row chunks in place (no second copy from concatenating)."""

    def __init__(self, fmt: str, shape: tuple[int, int], group: int = INT4_GROUP):
        n, k = shape
        if fmt == "int8":
            self.result: Int8Weight | Int4Weight = Int8Weight(torch.empty(n, k, dtype=torch.int8),
                                                      torch.empty(n, dtype=torch.bfloat16))
        else:
            self.result = Int4Weight(torch.empty(n, k // 2, dtype=torch.uint8),
                                     torch.empty(k // group, n, 2, dtype=torch.bfloat16), group)

    def write(self, start: int, chunk: Int8Weight | Int4Weight) -> None:
        rows = chunk.shape[0]
        if isinstance(self.result, Int8Weight) and isinstance(chunk, Int8Weight):
            self.result.q[start:start + rows] = chunk.q
            self.result.scale[start:start + rows] = chunk.scale
        elif isinstance(self.result, Int4Weight) and isinstance(chunk, Int4Weight):
            self.result.packed[start:start + rows] = chunk.packed
            self.result.scales_zeros[:, start:start + rows] = chunk.scales_zeros
        else:
            raise TypeError(f"a {type(chunk).__name__} chunk cannot go into a {type(self.result).__name__}")
