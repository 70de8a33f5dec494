"""sugam's own CPU kernels, compiled on first use for the CPU at hand:

- GGUF block products at the file's size (int8 activations times the blocks' codes), their exact
  dequantization, decode attention read in place through the paged KV cache, RMSNorm / rotary /
  silu(gate) * up as one call each, and decoder.cpp: all decoder layers of a decode step in one call.

Two implementations, one built per machine (the "ISA" below), chosen by the CPU's features:

- "avx512": gguf_matmul.cpp, gguf_block32.cpp, gguf_kquant.cpp, attention.cpp, layers.cpp, for
  x86-64 with AVX-512 VNNI (Intel since Cascade Lake / Ice Lake, AMD since Zen 4); AVX-512 BF16
  (Cooper Lake, Sapphire Rapids, Zen 4) is used where present, for one rounding instruction;
- "avx2" / "neon" / "scalar": portable/core.h, written once in 256-bit vectors (portable/vec.h)
  with an AVX2 backend (every x86-64 since Haswell / Zen 1; VNNI dot products where the CPU has
  AVX-VNNI), a NEON one (every aarch64 CPU; sdot with the dotprod extension) and plain C++ (any
  other CPU, and the reference the others are tested against).

The build needs a C++ compiler and `ninja`, takes ~15-30 s once and is cached by PyTorch
(~/.cache/torch_extensions). Without a compiler `available()` is False and sugam uses PyTorch's
own kernels (GGUF weights repacked by sugam/quant/gguf_repack.py, attention as PyTorch ops).
SUGAM_NATIVE_KERNELS=0 turns them off; SUGAM_NATIVE_ISA=avx2 (or scalar, ...) builds another
implementation than the CPU's best, where this CPU runs it (tests and benchmarks use that).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
from functools import cache
from pathlib import Path

import torch
from gguf import GGMLQuantizationType

from ..hardware import cpu_flags

log = logging.getLogger(__name__)

# GGML type name -> id (the kernels read the types in sugam/quant/gguf_pack.py and refuse others)
_GGML_IDS = {t.name: t.value for t in GGMLQuantizationType}
_DIR = Path(__file__).parent
_AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma")
_AVX2_FLAGS = ("avx2", "fma", "f16c")
_AVX512_SOURCES = ("gguf_matmul.cpp", "gguf_kquant.cpp", "gguf_block32.cpp", "attention.cpp", "layers.cpp", "lora.cpp",
                   "decoder.cpp")
_PORTABLE_SOURCES = ("portable/ops.cpp", "attention.cpp", "lora.cpp", "decoder.cpp")
ISAS = ("avx512", "avx2", "neon", "scalar")


@cache
def _arm_dotprod() -> bool:
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_DotProd"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() == "1"
        except (OSError, subprocess.SubprocessError):
            return False
    return "asimddp" in cpu_flags()


def runs_here(isa: str) -> bool:
    """This CPU executes the instructions of that implementation."""
    machine = platform.machine().lower()
    if isa == "scalar":
        return True
    if isa == "neon":
        return machine in ("aarch64", "arm64")
    if machine not in ("x86_64", "amd64"):
        return False
    return all(flag in cpu_flags() for flag in (_AVX512_FLAGS if isa == "avx512" else _AVX2_FLAGS))


@cache
def isa() -> str | None:
    """The implementation this process builds and uses: SUGAM_NATIVE_ISA where set (and runnable
    here), else the CPU's best; None when the kernels are turned off or cannot run here."""
    if os.environ.get("SUGAM_NATIVE_KERNELS", "1") == "0" or platform.system() not in ("Linux", "Darwin"):
        return None
    forced = os.environ.get("SUGAM_NATIVE_ISA", "").strip().lower()
    if forced:
        if forced not in ISAS or not runs_here(forced):
            log.warning("SUGAM_NATIVE_ISA=%s does not run on this CPU (choices: %s); using PyTorch's kernels",
                        forced, ", ".join(i for i in ISAS if runs_here(i)))
            return None
        return forced
    return next(i for i in ISAS if runs_here(i))


def _compile_flags(which: str) -> list[str]:
    flags = ["-O3", "-ffp-contract=off"]
    if platform.system() != "Darwin":  # Apple's clang has no -fopenmp: the kernels then run on one thread
        flags.append("-fopenmp")
    if which == "avx512":
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma"]
        # SUGAM_NATIVE_BF16=0 builds the integer rounding on a CPU that has the instruction (tests)
        if "avx512_bf16" in cpu_flags() and os.environ.get("SUGAM_NATIVE_BF16", "1") != "0":
            flags.append("-mavx512bf16")
        return flags
    if which == "avx2":
        return flags + ["-mavx2", "-mfma", "-mf16c"] + (["-mavxvnni"] if "avx_vnni" in cpu_flags() else [])
    if which == "neon":
        return flags + (["-march=armv8.2-a+dotprod"] if _arm_dotprod() else [])
    return flags + ["-DSUGAM_FORCE_SCALAR"]


def cpu_supported() -> bool:
    """This CPU can run the kernels (and they are not turned off); says nothing about the build."""
    return isa() is not None


@cache
def available() -> bool:
    """True when the kernels are built and loaded (building them on the first call)."""
    which = isa()
    if which is None:
        return False
    if shutil.which("ninja") is None:  # the `ninja` wheel's binary sits beside this Python's scripts
        os.environ["PATH"] = sysconfig.get_path("scripts") + os.pathsep + os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import load

        log.info("building sugam's CPU kernels for %s (once, ~15-30 s)", which)
        # One build folder per checkout, implementation and version of the sources (headers
        # included): two sugam installs on one machine would otherwise rebuild over each other's
        # library, even while another process has it loaded (seen as segfaults).
        flags = _compile_flags(which)
        sources = b"".join(p.read_bytes() for p in sorted(_DIR.rglob("*.[ch]*")))
        digest = hashlib.sha256(str(_DIR.resolve()).encode() + sources + " ".join(flags).encode()).hexdigest()[:16]
        names = _AVX512_SOURCES if which == "avx512" else _PORTABLE_SOURCES
        load(name=f"sugam_cpu_{which}_{digest}", sources=[str(_DIR / s) for s in names], is_python_module=False,
             extra_cflags=flags, extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [])
    except Exception as exc:  # no compiler, no ninja, ...: PyTorch's kernels still work
        log.warning("sugam's CPU kernels are unavailable (%s); using PyTorch's kernels", exc)
        return False
    return True


_ISA_LABELS = {"avx512": "AVX-512", "avx2": "AVX2", "neon": "NEON", "scalar": "portable C++"}


def isa_label() -> str:
    """The running build for people: "AVX-512", "AVX2", "AVX2 + AVX-VNNI", "NEON + dotprod", ..."""
    which = isa()
    if which is None:
        return "none"
    extra = ""
    if which == "avx2" and "avx_vnni" in cpu_flags():
        extra = " + AVX-VNNI"
    elif which == "neon" and _arm_dotprod():
        extra = " + dotprod"
    return _ISA_LABELS[which] + extra


def activation_block(qtype: str) -> int:
    """The number of activations that share one int8 scale in products with this GGML type: 256 for
    the K-quants (their integer sub-scales then apply to integer sums), 32 for the others."""
    return 256 if qtype in ("Q4_K", "Q5_K", "Q6_K") else 32


def packed_high_bits() -> str:
    """How the packed rows (sugam/quant/gguf_pack.py) arrange the bits above the nibbles for the
    running build: "planes" for AVX-512 (a masked add per plane), "shifts" for the portable builds (a
    shift per 8 or 16 values; bit planes cost AVX2 a shuffle and a compare each)."""
    return "planes" if isa() == "avx512" else "shifts"


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
                  kv_heads: int, intermediate: int, eps: float, scale: float, lora_a: list | None = None,
                  lora_b: list | None = None, lora_groups: list | None = None, lora_max_rank: int = 1) -> torch.Tensor:
    """Every decoder layer for one new token per sequence (the lists as models/native_decode.py builds them).
    LoRA: per layer the stacked A and Bt of its 4 groups, and the step's (slot, rows, rank) groups."""
    groups = lora_groups or []
    return torch.ops.sugam_cpu.decode_layers(x, cos, sin, matrices, qtypes, biases, norms, k_caches, v_caches,
                                             k_scales, v_scales, slots, block_tables, context_lens, heads,
                                             kv_heads, intermediate, eps, scale, lora_a or [], lora_b or [],
                                             [g[0] for g in groups], [g[1] for g in groups], [g[2] for g in groups],
                                             lora_max_rank)


def lora_add(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor, groups: list,
             max_rank: int) -> None:
    """y += the LoRA updates of x for each (slot, rows, rank) group, in place (sugam/native/lora.cpp)."""
    torch.ops.sugam_cpu.lora_add(y, x, lora_a, lora_bt, [g[0] for g in groups], [g[1] for g in groups],
                                 [g[2] for g in groups], max_rank)
