"""Every implementation of sugam's CPU kernels, on every CPU class this machine can reach.

- The portable kernels (sugam/native/portable/core.h) for each backend this machine can run or emulate,
  compared bit for bit with their scalar build by tests/native_harness (plain C++, no PyTorch): AVX2
  (vpmaddubsw, and 256-bit VNNI where the CPU has it) natively on x86, NEON with and without dotprod
  cross-compiled and run under qemu-aarch64 (Debian: g++-aarch64-linux-gnu, qemu-user).
- The torch ops of each implementation the CPU runs (AVX-512, AVX2, scalar) through
  tests/test_native_kernels.py, in a child process with SUGAM_NATIVE_ISA set (the scalar build
  against the GGUF reference's values; the others against the same numerics).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sugam import native
from sugam.hardware import cpu_flags

HARNESS = Path(__file__).parent / "native_harness"
X86 = platform.machine().lower() in ("x86_64", "amd64")
ARM = platform.machine().lower() in ("aarch64", "arm64")

# name -> (compiler flags, CPU flags it needs)
X86_BACKENDS = {
    "avx2": (["-mavx2", "-mfma", "-mf16c"], ["avx2", "fma", "f16c"]),
    "avx2-vnni512": (["-mavx2", "-mfma", "-mf16c", "-mavx512vnni", "-mavx512vl"], ["avx2", "fma", "f16c", "avx512_vnni", "avx512vl"]),
    "avx2-avxvnni": (["-mavx2", "-mfma", "-mf16c", "-mavxvnni"], ["avx2", "fma", "f16c", "avx_vnni"]),
}
ARM_BACKENDS = {"neon-dotprod": ["-march=armv8.2-a+dotprod"], "neon": ["-march=armv8-a"]}


def run_harness(cxx: str, flags: list[str], out: Path, runner: list[str], static: bool = False) -> str:
    common = ["-O2", "-std=c++17", "-ffp-contract=off"]
    link = ["-static"] if static else []
    objects = []
    for ns, extra in (("ref", ["-DSUGAM_FORCE_SCALAR"]), ("simd", flags)):
        obj = out / f"{ns}.o"
        subprocess.run([cxx, *common, *extra, f"-DSUGAM_CORE_NS={ns}", "-c", str(HARNESS / "backend.cpp"), "-o", str(obj)],
                       check=True, capture_output=True, text=True)
        objects.append(str(obj))
    binary = out / "harness"
    subprocess.run([cxx, *common, *link, str(HARNESS / "main.cpp"), *objects, "-o", str(binary)], check=True,
                   capture_output=True, text=True)
    result = subprocess.run([*runner, str(binary)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("backend", list(X86_BACKENDS))
def test_x86_backends_equal_the_scalar_reference(backend, tmp_path):
    flags, needs = X86_BACKENDS[backend]
    if not X86 or shutil.which("g++") is None:
        pytest.skip("needs an x86-64 machine with g++")
    missing = [f for f in needs if f not in cpu_flags()]
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(missing)}")
    out = run_harness("g++", flags, tmp_path, [])
    assert "0 failures" in out and "avx2" in out


@pytest.mark.parametrize("backend", list(ARM_BACKENDS))
def test_arm_backends_equal_the_scalar_reference(backend, tmp_path):
    if ARM and shutil.which("g++"):
        out = run_harness("g++", ARM_BACKENDS[backend], tmp_path, [])
    else:
        cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
        if cxx is None or qemu is None:
            pytest.skip("ARM kernels not tested: needs g++-aarch64-linux-gnu and qemu-user "
                        "(apt-get install g++-aarch64-linux-gnu qemu-user)")
        out = run_harness(cxx, ARM_BACKENDS[backend], tmp_path, [qemu, "-cpu", "max"], static=True)
    assert "0 failures" in out and "neon" in out


@pytest.mark.slow
@pytest.mark.parametrize("isa", [*native.ISAS, "avx512-integer-bf16-rounding"])
def test_kernel_ops_under_each_isa(isa):
    env = dict(os.environ, SUGAM_NATIVE_ISA=isa)
    if isa == "avx512-integer-bf16-rounding":
        # the AVX-512 build of a CPU without AVX-512 BF16 (Ice Lake, Cascade Lake), on one that has it;
        # on a CPU without it the plain "avx512" case above is already this build
        if "avx512_bf16" not in cpu_flags():
            pytest.skip("this CPU has no AVX-512 BF16: the avx512 case runs the integer rounding")
        env.update(SUGAM_NATIVE_ISA="avx512", SUGAM_NATIVE_BF16="0")
        isa = "avx512"
    if not native.runs_here(isa):
        pytest.skip(f"this CPU does not run the {isa} kernels")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(Path(__file__).parent / "test_native_kernels.py")],
                            capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]
