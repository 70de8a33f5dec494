"""What this machine's CPU does natively, for the choices that depend on it (compute dtype, kernels).

bf16 arithmetic is native on x86 with AVX-512 BF16 or AMX (Intel Cooper Lake / Sapphire Rapids and
later, AMD Zen 4 and later) and on ARMv8.6+ cores with the BF16 extension (Apple M2 and later,
Graviton 3/4, Neoverse V1/V2/N2). Elsewhere PyTorch emulates it by converting to fp32 and back:
its bf16 GEMMs run 2-3x slower than fp32 ones there, so sugam computes in fp32 on such CPUs.
"""

from __future__ import annotations

import platform
import subprocess
from functools import cache
from pathlib import Path

import torch

_X86_BF16 = ("avx512_bf16", "amx_bf16")


@cache
def cpu_flags() -> frozenset[str]:
    """Feature flags the kernel reports ("flags" on x86, "Features" on ARM Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@cache
def cpu_model() -> str:
    """The CPU's name as the OS reports it (e.g. "AMD EPYC 9R14"), or the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "CPU part") and value.strip():
                return value.strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.machine()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


@cache
def native_bf16() -> bool:
    """The CPU multiplies bf16 in hardware (so bf16 compute is faster than fp32, not slower)."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return any(flag in cpu_flags() for flag in _X86_BF16)
    if machine in ("aarch64", "arm64"):
        if platform.system() == "Darwin":
            try:
                out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                     timeout=5).stdout.strip()
                return out == "1"
            except (OSError, subprocess.SubprocessError):
                return False
        return "bf16" in cpu_flags()
    return False


def cpu_compute_dtype() -> torch.dtype:
    """The dtype a model computes in on this CPU when the user leaves it to sugam."""
    return torch.bfloat16 if native_bf16() else torch.float32


def cpu_label() -> str:
    """The CPU and what PyTorch's kernels use on it, for benchmark tables: "AMD EPYC (ATen AVX512, bf16 native)"."""
    return (f"{cpu_model()} (ATen {torch.backends.cpu.get_cpu_capability()}, "
            f"bf16 {'native' if native_bf16() else 'emulated'})")
