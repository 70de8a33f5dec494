"""Rotary position embeddings with the scalings real checkpoints use: linear, dynamic NTK, YaRN, llama3.

Frequencies are fixed at load time because cached keys were rotated with them. Dynamic NTK in
the reference recomputes all frequencies once a sequence outgrows the trained context, which a
KV cache cannot follow; we keep the trained frequencies (identical output within the trained
context) and rely on YaRN, which QwQ and Qwen3 use, for long contexts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .. import native
from .rmsnorm import NATIVE_DTYPES


def rope_inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None,
                  max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim/2], attention factor applied to cos/sin)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq, 1.0
    kind, factor = scaling["rope_type"], float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "dynamic":
        return inv_freq, 1.0
    original = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
    if kind == "llama3":
        low_ff, high_ff = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        low_wavelen, high_wavelen = original / low_ff, original / high_ff
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(head_dim, base, factor, original, scaling)
    raise ValueError(f"unknown rope_type {kind!r}")


def _yarn(dim: int, base: float, factor: float, original: int, p: dict[str, Any]) -> tuple[torch.Tensor, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float, scaling: dict[str, Any] | None, max_position_embeddings: int):
        super().__init__()
        self._args = (head_dim, base, scaling, max_position_embeddings)
        inv_freq, self.attention_factor = rope_inv_freq(*self._args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def init_frequencies(self, device: torch.device) -> None:
        """(Re)compute the frequencies in float32, e.g. after the module was built on `meta`
        or cast to a low-precision dtype with the rest of the model."""
        self.inv_freq = rope_inv_freq(*self._args)[0].to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [tokens, 1, head_dim], computed in float32 then cast."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim], rotated in the split-halves layout HF checkpoints use."""
    if (x.dtype in NATIVE_DTYPES and cos.dtype == x.dtype and x.is_cpu and x.shape[-1] % 32 == 0
            and native.available()):  # one call instead of ~6 ops, same rounding
        return native.rotary(x.contiguous(), cos.reshape(x.shape[0], -1), sin.reshape(x.shape[0], -1))
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
