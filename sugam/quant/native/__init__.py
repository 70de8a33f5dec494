"""sugam's own CPU kernels for GGUF blocks (gguf_cpu.cpp), compiled on first use.

They need an x86-64 CPU with AVX-512 VNNI (Intel since Cascade Lake, AMD since Zen 4), a C++
compiler and `ninja`; the build takes about a minute once and is cached by PyTorch
(~/.cache/torch_extensions). Anywhere else `available()` is False and GGUF weights are repacked
for PyTorch's own kernels instead (sugam/quant/gguf_repack.py). SUGAM_NATIVE_KERNELS=0 turns
them off.
"""

from __future__ import annotations

import logging
import os
import platform
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# GGML types the kernels read (name -> GGML type id).
SUPPORTED_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "f16c", "fma")
_SOURCE = Path(__file__).with_name("gguf_cpu.cpp")


def _cpu_has_flags() -> bool:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    present = set(flags.split(":", 1)[1].split())
    return all(flag in present for flag in _CPU_FLAGS)


@cache
def available() -> bool:
    """True when the kernels are built and loaded (building them on the first call)."""
    if os.environ.get("SUGAM_NATIVE_KERNELS", "1") == "0" or not _cpu_has_flags():
        return False
    try:
        from torch.utils.cpp_extension import load

        log.info("building sugam's CPU kernels (once, about a minute)")
        load(name="sugam_gguf_cpu", sources=[str(_SOURCE)], is_python_module=False,
             extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                           "-mavx512bf16", "-mf16c", "-mfma"],
             extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler, no ninja, ...: the PyTorch kernels still work
        log.warning("sugam's CPU kernels are unavailable (%s); using PyTorch's kernels", exc)
        return False
    return True


def supports(qtype: str) -> bool:
    return qtype in SUPPORTED_TYPES and available()


def matmul(x: torch.Tensor, raw: torch.Tensor, qtype: str, cols: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, cols] @ W^T (+ bias) -> [rows, out] in x's dtype, W given as raw GGUF rows."""
    return torch.ops.sugam_gguf.matmul(x, raw, SUPPORTED_TYPES[qtype], cols, bias)


def dequantize(raw: torch.Tensor, qtype: str, cols: int, out: torch.Tensor) -> torch.Tensor:
    """Write W [out, cols] (fp32 or bf16) into `out`; the values equal the GGUF reference's."""
    torch.ops.sugam_gguf.dequantize(raw, SUPPORTED_TYPES[qtype], cols, out)
    return out
