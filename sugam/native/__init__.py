"""sugam's own CPU kernels, compiled on first use:

- gguf_matmul.cpp: products with GGUF-quantized matrices at the file's size (int8 activations,
  AVX-512 VNNI), and their exact dequantization;
- attention.cpp: decode attention read in place through the paged KV cache's block tables;
- layers.cpp: RMSNorm, the rotary embedding and silu(gate) * up as one call each;
- decoder.cpp: all decoder layers of a decode step in one call (models/native_decode.py).

They need an x86-64 CPU with AVX-512 VNNI and BF16 (Intel since Cooper Lake / Sapphire Rapids, AMD
since Zen 4), a C++ compiler and `ninja`. The build takes ~15 s once and is cached by PyTorch
(~/.cache/torch_extensions). Anywhere else `available()` is False and sugam uses PyTorch's own
kernels (GGUF weights repacked by sugam/quant/gguf_repack.py, attention as PyTorch ops).
SUGAM_NATIVE_KERNELS=0 turns them off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sysconfig
from functools import cache
from pathlib import Path

import torch
from gguf import GGMLQuantizationType

from ..hardware import cpu_flags

log = logging.getLogger(__name__)

# GGML type name -> id (the kernels read the types in sugam/quant/gguf_pack.py and refuse others)
_GGML_IDS = {t.name: t.value for t in GGMLQuantizationType}
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "f16c", "fma")
_DIR = Path(__file__).parent
_SOURCES = [_DIR / name for name in ("gguf_matmul.cpp", "gguf_kquant.cpp", "gguf_block32.cpp", "attention.cpp",
                                      "layers.cpp", "decoder.cpp")]


def cpu_supported() -> bool:
    """This CPU can run the kernels (and they are not turned off); says nothing about the build."""
    if os.environ.get("SUGAM_NATIVE_KERNELS", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    return all(flag in cpu_flags() for flag in _CPU_FLAGS)


@cache
def available() -> bool:
    """True when the kernels are built and loaded (building them on the first call)."""
    if not cpu_supported():
        return False
    if shutil.which("ninja") is None:  # the `ninja` wheel's binary sits beside this Python's scripts
        os.environ["PATH"] = sysconfig.get_path("scripts") + os.pathsep + os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import load

        log.info("building sugam's CPU kernels (once, ~15 s)")
        # One build folder per checkout and version of the sources (headers included): two sugam
        # installs on one machine would otherwise rebuild over each other's library, even while
        # another process has it loaded (seen as segfaults).
        sources = b"".join(p.read_bytes() for p in sorted(_DIR.glob("*.[ch]*")))
        digest = hashlib.sha256(str(_DIR.resolve()).encode() + sources).hexdigest()[:16]
        load(name=f"sugam_cpu_{digest}", sources=[str(s) for s in _SOURCES], is_python_module=False,
             extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                           "-mavx512bf16", "-mf16c", "-mfma"],
             extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler, no ninja, ...: PyTorch's kernels still work
        log.warning("sugam's CPU kernels are unavailable (%s); using PyTorch's kernels", exc)
        return False
    return True


def ggml_type_id(qtype: str) -> int:
    return _GGML_IDS[qtype]


def gguf_matmul(x: torch.Tensor, packed: torch.Tensor, qtype: str, cols: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, cols] @ W^T (+ bias) -> [rows, out] in x's dtype, W in sugam's packed GGUF layout."""
    return torch.ops.sugam_cpu.gguf_matmul(x, packed, _GGML_IDS[qtype], cols, bias)


def gguf_dequantize(packed: torch.Tensor, qtype: str, cols: int, out: torch.Tensor) -> torch.Tensor:
    """Write W [out, cols] (fp32 or bf16) into `out`; the values equal the GGUF reference's."""
    torch.ops.sugam_cpu.gguf_dequantize(packed, _GGML_IDS[qtype], cols, out)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     k_scales: torch.Tensor | None, v_scales: torch.Tensor | None,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence: q [n, heads, dim] -> [n, heads, dim], computed in fp32."""
    return torch.ops.sugam_cpu.decode_attention(q, k_cache, v_cache, k_scales, v_scales,
                                                block_tables, context_lens, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)) over the last dimension (contiguous x, last dimension a multiple of 16)."""
    return torch.ops.sugam_cpu.rms_norm(x, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2 * inter] -> silu(first half) * second half."""
    return torch.ops.sugam_cpu.silu_mul(gate_up)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, dim] rotated in the split-halves layout; cos, sin [tokens, dim]."""
    return torch.ops.sugam_cpu.rotary(x, cos, sin)


def decode_layers(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, matrices: list, qtypes: list[int],
                  biases: list, norms: list, k_caches: list, v_caches: list, k_scales: list, v_scales: list,
                  slots: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, heads: int,
                  kv_heads: int, intermediate: int, eps: float, scale: float) -> torch.Tensor:
    """Every decoder layer for one new token per sequence (the lists as models/native_decode.py builds them)."""
    return torch.ops.sugam_cpu.decode_layers(x, cos, sin, matrices, qtypes, biases, norms, k_caches, v_caches,
                                             k_scales, v_scales, slots, block_tables, context_lens, heads,
                                             kv_heads, intermediate, eps, scale)
