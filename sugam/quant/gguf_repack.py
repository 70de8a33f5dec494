"""GGUF blocks -> in-memory formats, one row chunk at a time (no full-precision copy of a tensor).

Where sugam's own CPU kernels run, matrices keep the file's blocks (`pack_for_kernels`, exact).
Elsewhere they are repacked for PyTorch's kernels (`repack`):

4-bit types map onto Int4Weight group for group: Q4_0, Q4_1 and Q4_K all use groups of 32 with
w = scale * code + offset, so the codes carry over unchanged and only the scale and offset are
rounded to the kernel's bf16 (relative error <= 2^-9 of the scale). 5-, 6- and 8-bit types are
requantized per output row to int8 (their codes do not fit 4 bits, and no PyTorch CPU kernel
reads 5- or 6-bit codes); the error is at most half an int8 step of the row.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import Q4_K
from gguf.quants import dequantize as gguf_dequantize

from .formats import (
    INT4_GROUP,
    INT4_ROW_BLOCK,
    Int4Weight,
    Int8Weight,
    PackedGGUFWeight,
    RowWriter,
    int4_supported,
    pack_int4,
    quantize_int4,
    quantize_int8,
)
from .gguf_pack import pack_rows, packed_row_bytes

FOUR_BIT_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q4_K)
_CHUNK_VALUES = 1 << 20  # ~4 MB of float32 temporaries per step


def _rows_per_chunk(cols: int) -> int:
    rows = max(INT4_ROW_BLOCK, _CHUNK_VALUES // max(cols, 1))
    return rows - rows % INT4_ROW_BLOCK


def _fp16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def four_bit_groups(raw: np.ndarray, qtype: QT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes (uint8 0..15), scale and offset (float32) of each group of 32 values, such that
    value = scale * code + offset is exactly what the GGUF reference dequantization computes.

    raw: uint8 [rows, bytes_per_row]. Returns codes [rows, cols], scale and offset [rows, cols // 32].
    """
    rows = raw.shape[0]
    values = gguf_dequantize(raw, qtype).reshape(rows, -1, INT4_GROUP)  # reference fp32
    if qtype == QT.Q4_0:
        blocks = raw.reshape(-1, 18)
        scale = _fp16(blocks[:, :2])
        offset = -8 * scale
    elif qtype == QT.Q4_1:
        blocks = raw.reshape(-1, 20)
        scale, offset = _fp16(blocks[:, :2]), _fp16(blocks[:, 2:4])
    elif qtype == QT.Q4_K:
        blocks = raw.reshape(-1, 144)
        d, dmin = _fp16(blocks[:, :2]), _fp16(blocks[:, 2:4])
        sc, mn = Q4_K.get_scale_min(blocks[:, 4:16])
        scale = (d * sc.astype(np.float32)).reshape(-1)
        offset = -(dmin * mn.astype(np.float32)).reshape(-1)
    else:
        raise ValueError(f"{qtype.name} is not a 4-bit type")
    scale = scale.reshape(rows, -1)
    offset = offset.reshape(rows, -1)
    safe = np.where(scale == 0, 1, scale)
    codes = np.rint((values - offset[..., None]) / safe[..., None])
    codes = np.clip(codes, 0, 15).astype(np.uint8).reshape(rows, -1)
    return codes, scale, offset


def repack(raw: np.ndarray, qtype: QT, shape: tuple[int, int], target: str) -> Int8Weight | Int4Weight:
    """Convert one GGUF matrix (raw rows, torch shape (out, in)) to `target` ("int8" or "int4")."""
    out_features, in_features = shape
    step = _rows_per_chunk(in_features)
    out = RowWriter(target, shape)
    for start in range(0, out_features, step):
        rows = raw[start:start + step]
        if target == "int4" and qtype in FOUR_BIT_TYPES and int4_supported(shape):
            codes, scale, offset = four_bit_groups(rows, qtype)
            scale_t = torch.from_numpy(scale)
            out.write(start, pack_int4(torch.from_numpy(codes), scale_t, torch.from_numpy(offset) + 8 * scale_t))
            continue
        values = torch.from_numpy(np.ascontiguousarray(dequantize_rows(rows, qtype)).reshape(len(rows), in_features))
        out.write(start, quantize_int4(values) if target == "int4" else quantize_int8(values))
    return out.result


def pack_for_kernels(raw: np.ndarray, qtype: QT, shape: tuple[int, int]) -> PackedGGUFWeight:
    """One GGUF matrix (raw rows, torch shape (out, in)) -> sugam's kernel layout, a row chunk at a time."""
    out_features, in_features = shape
    packed = torch.empty(out_features, packed_row_bytes(qtype.name, in_features), dtype=torch.uint8)
    step = _rows_per_chunk(in_features)
    for start in range(0, out_features, step):
        packed[start:start + step] = torch.from_numpy(pack_rows(raw[start:start + step], qtype.name, in_features))
    return PackedGGUFWeight(packed, qtype.name, in_features)


def dequantize_rows(rows: np.ndarray, qtype: QT) -> np.ndarray:
    """Float32 values of GGUF rows of any supported type, as the reference kernels compute them
    (always a new array: the file's mapping is read-only)."""
    if qtype == QT.F32:
        return np.array(rows, dtype=np.float32)
    if qtype == QT.F16:
        return np.asarray(rows).astype(np.float32)
    if qtype == QT.BF16:
        return (np.asarray(rows).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return gguf_dequantize(rows, qtype)
