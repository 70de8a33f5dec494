"""Every CPU-dependent path sugam can take, checked on whatever CPU runs the suite.

What sugam computes with depends on the CPU: its own AVX-512 kernels or PyTorch's; ATen's kernels for
the CPU capability it detects (DEFAULT, AVX2, AVX512, ...), whose int4 packing differs; bf16 or fp32
compute. A path this machine cannot reach natively is forced where it can be (SUGAM_NATIVE_KERNELS=0,
ATEN_CPU_CAPABILITY=avx2 / default in a child process) and skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_hf_model, greedy_with_logits, train_tokenizer
from gguf_writer import write_gguf

from sugam import LLM, hardware
from sugam.quant.formats import _KNOWN_LAYOUTS, pack_codes, unpack_codes

PROBE = Path(__file__).parent / "path_probe.py"
CAPABILITIES = ["default", "avx2", "avx512"]


def run_probe(args: list[str], env: dict[str, str], timeout: int = 900) -> dict:
    proc = subprocess.run([sys.executable, str(PROBE), *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reachable(capability: str) -> bool:
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          env={**os.environ, "ATEN_CPU_CAPABILITY": capability}, capture_output=True, text=True)
    return proc.stdout.strip().lower() == capability


@pytest.mark.parametrize("layout", _KNOWN_LAYOUTS, ids=str)
def test_int4_layouts_unpack_what_they_pack(layout):
    codes = torch.randint(0, 16, (128, 96), dtype=torch.uint8)
    assert torch.equal(layout.unpack(layout.pack(codes)), codes)
    assert torch.equal(unpack_codes(pack_codes(codes)), codes)


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_int4_dequantizes_to_exactly_what_its_kernel_multiplies_by(capability):
    """On each ATen capability this CPU can run: the unpacked weight equals the kernel's (identity
    product in fp32), and the prompt path (dequantize + GEMM, whole and in row chunks) agrees with it."""
    if not reachable(capability):
        pytest.skip(f"ATen capability {capability} cannot run on this CPU ({torch.backends.cpu.get_cpu_capability()})")
    result = run_probe(["int4"], {"ATEN_CPU_CAPABILITY": capability})
    assert result["capability"].lower() == capability
    assert result["layout"] != "None", "PyTorch's int4 packing was not recognised"
    assert result["dequantize_equals_kernel"], result
    assert result["prompt_path_error"] < 1e-5, result


def test_auto_dtype_is_bf16_only_where_the_cpu_has_bf16_arithmetic(monkeypatch):
    from sugam.llm import pick_dtype

    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "native_bf16", lambda: False)
    assert pick_dtype("auto", cpu, quantized=True) == torch.float32
    assert pick_dtype("auto", cpu, quantized=False) == torch.bfloat16  # dense weights: half the memory
    monkeypatch.setattr(hardware, "native_bf16", lambda: True)
    assert pick_dtype("auto", cpu, quantized=True) == torch.bfloat16
    assert pick_dtype("float32", cpu) == torch.float32


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    hardware.native_bf16.cache_clear()
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    assert not hardware.native_bf16()
    hardware.native_bf16.cache_clear()
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert hardware.native_bf16()
    hardware.native_bf16.cache_clear()
    monkeypatch.setattr(hardware.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"fp", "asimd", "asimddp", "bf16"}))
    assert hardware.native_bf16()
    hardware.native_bf16.cache_clear()


def test_gguf_without_bf16_arithmetic_stays_quantized_in_fp32_and_float32_is_the_reference(tmp_path, monkeypatch):
    from gguf import GGMLQuantizationType as QT

    model = build_hf_model(tmp_path / "hf", "qwen2")
    path = tmp_path / "m.gguf"
    write_gguf(path, model, train_tokenizer(), quant=QT.Q4_0)
    exact = LLM(str(path), dtype="float32")
    assert exact.engine.runner.quantization == "none"  # an explicit float32: the dense reference
    monkeypatch.setattr("sugam.engine.runner.native_kernels.available", lambda: False)
    monkeypatch.setattr(hardware, "native_bf16", lambda: False)
    auto = LLM(str(path))
    runner = auto.engine.runner
    assert runner.quantization == "gguf" and runner.dtype == torch.float32
    path_info = runner.execution_path()
    assert path_info["kernels"] == "pytorch" and path_info["compute_dtype"] == "float32"
    assert any(name.startswith("int4") for name in path_info["weights"])  # Q4_0 -> int4, same codes
    prompt = list(range(5, 45))  # 40 tokens: the prompt path (dequantize + fp32 GEMM), then decode steps
    ref_tokens, ref_logits = greedy_with_logits(exact, prompt, 4)
    tokens, logits = greedy_with_logits(auto, prompt, 4)
    _, bf16_logits = greedy_with_logits(LLM(str(path), dtype="bfloat16", quantization="none"), prompt, 4)
    # The kernels take bf16 rows (and K/V are kept in bf16), so the error is of the order of plain bf16's
    # on this tiny random model (3-4 %; a wrong unpacking is ~100 %). Logits are compared while the
    # tokens before them agree: a near-tie of the random model may flip a later token.
    agree = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
    assert agree >= 1  # the prompt's token; logits[1] then checks a decode step
    for got, bf16, want in list(zip(logits, bf16_logits, ref_logits))[:agree + 1]:
        assert (got - want).norm() / want.norm() < min(3 * (bf16 - want).norm() / want.norm(), 0.12)


def test_int4_folder_loads_on_another_cpu_capability(tmp_path, tiny_models):
    """`sugam quantize` stores plain codes, so a folder made here loads with the same weights under
    another ATen capability (whose kernel packs int4 differently); an old CPU-specific folder is refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sugam.cli import main
    from sugam.errors import ModelFormatError

    folder = tmp_path / "q"
    assert main(["quantize", str(tiny_models["qwen2"][0]), str(folder), "--quantization", "int4"]) == 0
    here = LLM(str(folder), dtype="float32")
    layer = here.engine.runner.model.model.layers[0].mlp.down_proj
    weight = layer.quantized_weight.dequantize()
    script = (f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r});"
              f"from sugam import LLM; llm = LLM({str(folder)!r}, dtype='float32');"
              "w = llm.engine.runner.model.model.layers[0].mlp.down_proj.quantized_weight.dequantize();"
              f"torch.save(w, {str(tmp_path / 'w.pt')!r})")
    for capability in ("default", "avx2"):
        if not reachable(capability):
            continue
        subprocess.run([sys.executable, "-c", script], env={**os.environ, "ATEN_CPU_CAPABILITY": capability},
                       check=True, capture_output=True)
        assert torch.equal(torch.load(tmp_path / "w.pt"), weight), capability

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    save_file(tensors, str(folder / "model.safetensors"), metadata={**meta, "int4_layout": "torch-cpu-int4pack"})
    with pytest.raises(ModelFormatError, match="sugam quantize"):
        LLM(str(folder))


def test_run_prints_the_path_it_chose(tiny_models, capsys):
    from sugam.cli import main

    assert main(["run", str(tiny_models["qwen2"][0]), "hi", "--max-tokens", "2", "--temperature", "0"]) == 0
    header = capsys.readouterr().err.splitlines()[0]
    assert "cpu " in header and torch.backends.cpu.get_cpu_capability() in header
    assert "kernels" in header and "compute bfloat16" in header and "weights:" in header


# ---- the real default model on every path this CPU can take -----------------------------------

MODEL = "qwen2.5-coder-0.5b-instruct"
NO_KERNELS = {"SUGAM_NATIVE_KERNELS": "0"}
# (id, environment, dtype, quantization, allowed perplexity increase over the fp32 reference)
PATHS = [
    ("default", {}, "auto", "auto", 0.01),
    ("no-kernels", NO_KERNELS, "auto", "auto", 0.01),
    ("no-kernels-fp32", NO_KERNELS, "float32", "gguf", 0.01),
    ("aten-avx2-fp32", {**NO_KERNELS, "ATEN_CPU_CAPABILITY": "avx2"}, "float32", "gguf", 0.01),
    # what an AVX2 CPU (no bf16 arithmetic) runs by default: sugam's AVX2 kernels, fp32 compute; every
    # prompt row through the kernels too (their batched path), not only decode
    ("avx2-kernels-fp32", {"SUGAM_NATIVE_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "SUGAM_PACKED_KERNEL_MAX_ROWS": "100000"},
     "float32", "gguf", 0.01),
    # (ATen DEFAULT's packing is checked by test_int4_dequantizes_to_exactly_what_its_kernel_multiplies_by;
    # its scalar kernels take minutes over a real model's vocabulary-sized head.)
    ("int8", {}, "auto", "int8", 0.01),
    ("int8-fp32", NO_KERNELS, "float32", "int8", 0.01),
    # int4 requantizes the file's 5-bit matrices to 4 bits: a real loss (+6 % measured), not a broken one
    ("int4", NO_KERNELS, "auto", "int4", 0.10),
]


def _same_as_earlier(index: int) -> str | None:
    """The id of an earlier path that is the same on this CPU ("auto" resolves to one dtype here)."""
    def effective(path: tuple) -> tuple:
        _, env, dtype, quantization, _ = path
        if dtype == "auto":
            dtype = "bfloat16" if hardware.native_bf16() else "float32"
        return tuple(sorted(env.items())), dtype, "gguf" if quantization == "auto" else quantization
    return next((p[0] for p in PATHS[:index] if effective(p) == effective(PATHS[index])), None)


@pytest.fixture(scope="module")
def fp32_reference():
    from sugam.registry import pull

    pull(MODEL, progress=False)
    return run_probe(["model", MODEL, "float32", "none"], {})


@pytest.mark.slow
@pytest.mark.parametrize("name,env,dtype,quantization,bound", PATHS, ids=[p[0] for p in PATHS])
def test_real_model_is_right_on_every_path_this_cpu_can_take(request, name, env, dtype, quantization, bound):
    same = _same_as_earlier([p[0] for p in PATHS].index(name))
    if same:
        pytest.skip(f"the same path as {same} on this CPU (bf16 {'native' if hardware.native_bf16() else 'emulated'})")
    if dtype == "bfloat16" and not hardware.native_bf16():
        pytest.skip("bf16 arithmetic is emulated on this CPU: sugam never picks it here (correct, but slow)")
    capability = env.get("ATEN_CPU_CAPABILITY")
    if capability and not reachable(capability):
        pytest.skip(f"ATen capability {capability} cannot run on this CPU")
    if capability and capability == torch.backends.cpu.get_cpu_capability().lower():
        pytest.skip(f"{capability} is this CPU's own capability: the no-kernels paths cover it")
    fp32_reference = request.getfixturevalue("fp32_reference")
    result = run_probe(["model", MODEL, dtype, quantization], env)
    path = result["path"]
    print(f"\n{name}: perplexity {result['perplexity']:.3f} (fp32 reference {fp32_reference['perplexity']:.3f}); "
          f"{path['kernels']} kernels, {path['cpu_capability']}, compute {path['compute_dtype']}, "
          f"weights {path['weights']}")
    assert result["tokens"] == fp32_reference["tokens"] > 400  # one window of 512
    assert result["perplexity"] <= fp32_reference["perplexity"] * (1 + bound), result
    if quantization != "int4":
        assert "s[::-1]" in result["answer"], result["answer"]  # the README's example answer
