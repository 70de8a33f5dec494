"""GGUF blocks -> the row layout sugam's CPU kernels read (sugam/native/gguf_matmul.cpp describes it).

Only the arrangement changes: the codes and the scales are the file's own bits, so every value
dequantizes exactly as the GGUF reference computes it, and a row takes the file's bytes (Q4_K/Q5_K
+1.4 %: their 6-bit sub-scales are stored a byte each).
"""

from __future__ import annotations

import numpy as np
from gguf.quants import Q4_K

# name -> (values a block, bytes a block) in the GGUF file
FILE_BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
               "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
_HIGH_PLANES = {"Q5_0": 1, "Q5_1": 1, "Q5_K": 1, "Q6_K": 2}


def packable(qtype: str, cols: int) -> bool:
    """The kernels need whole 64-value chunks (and the file's whole blocks)."""
    return qtype in FILE_BLOCKS and cols % 64 == 0 and cols % FILE_BLOCKS[qtype][0] == 0


def packed_row_bytes(qtype: str, cols: int) -> int:
    k = cols
    codes = k if qtype == "Q8_0" else k // 2
    high = k // 8 * _HIGH_PLANES.get(qtype, 0)
    if qtype in ("Q8_0", "Q4_0", "Q5_0"):
        scales = k // 32 * 2
    elif qtype in ("Q4_1", "Q5_1"):
        scales = k // 32 * 4
    elif qtype in ("Q4_K", "Q5_K"):
        scales = k // 256 * 4 + k // 32 * 2
    else:  # Q6_K
        scales = k // 256 * 2 + k // 16
    return codes + high + scales


def _codes_and_scales(raw: np.ndarray, qtype: str, cols: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Unsigned codes [rows, cols] and the scale sections (uint8 [rows, n] each, in layout order)."""
    rows = raw.shape[0]
    values, nbytes = FILE_BLOCKS[qtype]
    b = raw.reshape(rows, cols // values, nbytes)
    if qtype == "Q8_0":
        return (b[..., 2:34] ^ np.uint8(0x80)).reshape(rows, cols), [b[..., 0:2].reshape(rows, -1)]
    if qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        has_min, five = qtype.endswith("_1"), qtype.startswith("Q5")
        qs_at = 2 + 2 * has_min + 4 * five
        qs = b[..., qs_at:qs_at + 16]
        codes = np.concatenate([qs & 15, qs >> 4], axis=-1)  # values 0-15 low nibbles, 16-31 high
        if five:
            at = 2 + 2 * has_min
            qh = np.ascontiguousarray(b[..., at:at + 4]).view("<u4")  # [rows, blocks, 1]
            codes |= (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)
        scales = [b[..., 0:2].reshape(rows, -1)] + ([b[..., 2:4].reshape(rows, -1)] if has_min else [])
        return codes.reshape(rows, cols), scales
    if qtype in ("Q4_K", "Q5_K"):
        five = qtype == "Q5_K"
        qs_at = 48 if five else 16
        qs = b[..., qs_at:qs_at + 128].reshape(rows, -1, 4, 32)
        low, high = qs & 15, qs >> 4  # sub-blocks 2j and 2j+1 of each 64
        if five:
            qh = b[..., 16:48][:, :, None, :]                      # bit 2j / 2j+1 of qh[l]
            shift = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
            low = low | (((qh >> shift) & 1) << 4)
            high = high | (((qh >> (shift + 1)) & 1) << 4)
        codes = np.stack([low, high], axis=3).reshape(rows, cols)
        sc, mn = Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12))
        scales = [b[..., 0:2].reshape(rows, -1), b[..., 2:4].reshape(rows, -1),
                  sc.astype(np.uint8).reshape(rows, -1), mn.astype(np.uint8).reshape(rows, -1)]
        return codes, scales
    if qtype == "Q6_K":
        ql = b[..., :128].reshape(rows, -1, 2, 64)
        qh = b[..., 128:192].reshape(rows, -1, 2, 32)
        l0, l1 = ql[..., :32], ql[..., 32:]
        parts = [(l0 & 15) | ((qh & 3) << 4), (l1 & 15) | (((qh >> 2) & 3) << 4),
                 (l0 >> 4) | (((qh >> 4) & 3) << 4), (l1 >> 4) | (((qh >> 6) & 3) << 4)]
        codes = np.stack(parts, axis=3).reshape(rows, cols)
        return codes, [b[..., 208:210].reshape(rows, -1), b[..., 192:208].reshape(rows, -1)]
    raise ValueError(f"no packing for {qtype}")


def pack_rows(raw: np.ndarray, qtype: str, cols: int, high_bits: str | None = None) -> np.ndarray:
    """GGUF rows (uint8 [rows, file bytes a row]) -> uint8 [rows, packed_row_bytes(qtype, cols)].
    high_bits: how the bits above the nibbles are arranged, "planes" or "shifts" (gguf_matmul.cpp
    describes both); by default the one the running kernels' build reads."""
    if high_bits is None:
        from .. import native

        high_bits = native.packed_high_bits()
    if not packable(qtype, cols):
        raise ValueError(f"{qtype} rows of {cols} values cannot be packed for the kernels")
    rows = raw.shape[0]
    codes, scales = _codes_and_scales(np.asarray(raw, dtype=np.uint8), qtype, cols)
    chunks = codes.reshape(rows, -1, 64)
    sections: list[np.ndarray] = [codes] if qtype == "Q8_0" else [((chunks[..., :32] & 15) | ((chunks[..., 32:] & 15) << 4)).reshape(rows, -1)]
    planes = _HIGH_PLANES.get(qtype, 0)
    if planes and high_bits == "planes":  # per chunk one little-endian 64-bit word per bit
        bits = [np.packbits((chunks >> (4 + p)) & 1, axis=-1, bitorder="little") for p in range(planes)]
        sections.append(np.concatenate(bits, axis=-1).reshape(rows, -1))
    elif qtype == "Q6_K":  # per chunk 16 bytes: byte i holds bits 4-5 of values i, 16+i, 32+i, 48+i (2 bits each)
        pairs = ((chunks >> 4) & 3).reshape(rows, -1, 4, 16) << (2 * np.arange(4, dtype=np.uint8))[:, None]
        sections.append(np.bitwise_or.reduce(pairs, axis=2).reshape(rows, -1))
    elif planes:  # per chunk 8 bytes: bit p of byte i is bit 4 of value 8p + i
        bit4 = ((chunks >> 4) & 1).reshape(rows, -1, 8, 8) << np.arange(8, dtype=np.uint8)[:, None]
        sections.append(np.bitwise_or.reduce(bit4, axis=2).reshape(rows, -1))
    out = np.concatenate(sections + scales, axis=1)
    assert out.shape[1] == packed_row_bytes(qtype, cols)
    return out
