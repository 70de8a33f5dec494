"""Quantized weights in memory: GGUF repacking is exact, kernels agree with dense math, models load and run."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from conftest import build_hf_model, greedy_with_logits, train_tokenizer
from gguf import GGMLQuantizationType as QT
from gguf_writer import write_gguf

from sugam import LLM, native
from sugam.loader.gguf import GGUFFile
from sugam.quant import Int4Weight, Int8Weight, QuantizedLinear, quantize_int4, quantize_int8
from sugam.quant.formats import pack_int4, quantize
from sugam.quant.gguf_repack import four_bit_groups, repack
from sugam.quant.linear import KERNEL_MAX_ROWS, quantized_matmul
from sugam.sampling_params import InvalidRequestError

BLOCK_BYTES = {QT.Q4_0: 18, QT.Q4_1: 20, QT.Q4_K: 144}
BLOCK_VALUES = {QT.Q4_0: 32, QT.Q4_1: 32, QT.Q4_K: 256}


def random_blocks(qtype: QT, rows: int, cols: int, rng: np.random.Generator, bf16_exact: bool = False) -> np.ndarray:
    """Valid GGUF blocks with random codes and random (finite) fp16 scales."""
    n_blocks = rows * cols // BLOCK_VALUES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, BLOCK_BYTES[qtype]), dtype=np.uint8)
    n_scales = 2 if qtype in (QT.Q4_1, QT.Q4_K) else 1
    scales = rng.uniform(1e-3, 2e-2, size=(n_blocks, n_scales)).astype(np.float16)
    if bf16_exact:  # keep 8 significant bits, so that bf16 holds the scale exactly
        scales = (scales.view(np.uint16) & np.uint16(0xFFF8)).view(np.float16)
    if qtype == QT.Q4_1 and bf16_exact:
        # offset m + 8 d must be bf16-exact too: m = -8 d gives zero exactly
        scales[:, 1] = (-8 * scales[:, 0].astype(np.float32)).astype(np.float16)
    raw[:, :2 * n_scales] = scales.view(np.uint8).reshape(n_blocks, -1)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q4_K])
def test_four_bit_codes_and_scales_reproduce_gguf_exactly(qtype):
    rng = np.random.default_rng(0)
    raw = random_blocks(qtype, 128, 512, rng)
    reference = gguf.quants.dequantize(raw, qtype).reshape(128, 512)
    codes, scale, offset = four_bit_groups(raw, qtype)
    assert codes.min() >= 0 and codes.max() <= 15
    rebuilt = (scale[..., None] * codes.reshape(128, -1, 32).astype(np.float32) + offset[..., None]).reshape(128, 512)
    assert np.array_equal(rebuilt, reference)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q4_K])
def test_repacked_int4_dequantizes_to_gguf_reference(qtype):
    rng = np.random.default_rng(1)
    raw = random_blocks(qtype, 128, 512, rng, bf16_exact=qtype != QT.Q4_K)
    reference = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(128, 512))
    weight = repack(raw, qtype, (128, 512), "int4")
    assert isinstance(weight, Int4Weight)
    codes, _, _ = four_bit_groups(raw, qtype)
    assert torch.equal(weight.codes(), torch.from_numpy(codes))  # the 4-bit codes carry over unchanged
    got = weight.dequantize()
    if qtype == QT.Q4_K:
        # The sub-block scale d*sc and offset need more than bf16's 8 significant bits, so the kernel's
        # bf16 copies are rounded: error <= half a bf16 ulp of (code - 8) * scale plus one of the offset.
        scale = weight.scales_zeros[..., 0].float().t().repeat_interleave(32, dim=1)
        zero = weight.scales_zeros[..., 1].float().t().repeat_interleave(32, dim=1)
        bound = (8 * scale.abs() + zero.abs()) * 2**-8
        assert ((got - reference).abs() <= bound + 1e-7).all()
    else:
        assert torch.equal(got, reference)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q5_0, QT.Q5_1, QT.Q6_K])
def test_wider_types_requantize_to_int8_within_half_a_step(qtype):
    rng = np.random.default_rng(2)
    values = rng.normal(0, 0.05, size=(64, 512)).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype) if qtype != QT.Q6_K else None
    if raw is None:  # gguf-py cannot quantize Q6_K: random blocks with a sane fp16 super-scale
        raw = rng.integers(0, 256, size=(64 * 2, 210), dtype=np.uint8)
        raw[:, 208:] = np.full((64 * 2, 1), 1e-3, dtype=np.float16).view(np.uint8)
        raw = raw.reshape(64, -1)
    reference = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(64, 512))
    weight = repack(raw, qtype, (64, 512), "int8")
    assert isinstance(weight, Int8Weight)
    step = weight.scale.float()[:, None]
    assert ((weight.dequantize() - reference).abs() <= step / 2 + 1e-7).all()


def test_int4_packing_layout_round_trips_and_packs_in_chunks():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (256, 128), dtype=torch.uint8)
    scale, zero = torch.rand(256, 4) + 0.5, torch.randn(256, 4)
    whole = pack_int4(codes, scale, zero)
    chunked = pack_int4(codes, scale, zero, rows_per_chunk=64)
    assert torch.equal(whole.packed, chunked.packed)
    assert torch.equal(whole.codes(), codes)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 31])
def test_quantized_matmul_matches_dense_math_on_the_same_weights(fmt, rows):
    torch.manual_seed(0)
    w = torch.randn(192, 256) * 0.05
    weight = quantize_int8(w) if fmt == "int8" else quantize_int4(w)
    x = torch.randn(rows, 256).bfloat16()
    expected = x.float() @ weight.dequantize().t()
    got = quantized_matmul(x, weight).float()
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantization_error_is_bounded(fmt):
    torch.manual_seed(0)
    w = torch.randn(128, 256) * 0.05
    err = (quantize(w, fmt, rows_per_chunk=64).dequantize() - w).abs()
    # int8: half a step of each row (+ bf16 scale rounding); int4: about half a step of each group of 32
    limit = w.abs().amax(1, keepdim=True) / 127 * 0.51 if fmt == "int8" else \
        (w.view(128, 8, 32).amax(-1) - w.view(128, 8, 32).amin(-1)).repeat_interleave(32, 1) / 15 * 0.55
    assert (err <= limit).all()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kernels", ["sugam", "pytorch"])
@pytest.mark.parametrize("quant", [QT.Q4_0, QT.Q8_0])
def test_gguf_model_keeps_weights_quantized_and_agrees_with_dense(tmp_path, monkeypatch, quant, kernels):
    if kernels == "sugam" and not native.available():
        pytest.skip("sugam's CPU kernels do not run on this machine")
    if kernels == "pytorch":
        monkeypatch.setattr("sugam.engine.runner.native_kernels.available", lambda: False)
    model = build_hf_model(tmp_path / "hf", "qwen2", intermediate_size=256)
    path = tmp_path / "m.gguf"
    write_gguf(path, model, train_tokenizer(), quant=quant)
    dense = LLM(str(path), dtype="bfloat16", quantization="none")
    exact = LLM(str(path), dtype="float32")
    packed = LLM(str(path), dtype="bfloat16")  # auto: GGUF on CPU in bf16 stays quantized
    runner = packed.engine.runner
    assert runner.quantization == "gguf"
    mlp = runner.model.model.layers[0].mlp
    assert isinstance(mlp.gate_up_proj.parts[0], QuantizedLinear)  # gate and up fused after loading
    expected = "packed" if kernels == "sugam" else "int4" if quant == QT.Q4_0 else "int8"
    assert mlp.gate_up_proj.parts[0].weight_format == expected
    assert runner.weight_bytes < dense.engine.runner.weight_bytes
    prompt = [5, 17, 42, 99, 7, 3, 250, 11]
    _, logits = greedy_with_logits(packed, prompt, 1)
    _, bf16_logits = greedy_with_logits(dense, prompt, 1)
    _, fp32_logits = greedy_with_logits(exact, prompt, 1)
    # Against the exact fp32 reference the quantized path errs on the order of plain bf16 (bf16
    # activations and kernel scales; the odd-sized head and embedding are requantized to int8).
    # A wrong layout or scale would be off by ~100 %.
    err_packed, err_bf16 = _relative_error(logits[0], fp32_logits[0]), _relative_error(bf16_logits[0], fp32_logits[0])
    assert err_packed < min(3 * err_bf16, 0.12)


def test_fp32_default_stays_dense_and_explicit_modes_apply_to_hf(tiny_models):
    folder, _ = tiny_models["qwen2"]
    exact = LLM(str(folder), dtype="float32")
    assert exact.engine.runner.quantization == "none"
    dense = LLM(str(folder), dtype="bfloat16")
    assert dense.engine.runner.quantization == "none"  # HF checkpoints load as they are unless asked
    prompt = [5, 17, 42, 99, 7, 3, 250, 11]
    _, ref = greedy_with_logits(exact, prompt, 1)
    _, bf16 = greedy_with_logits(dense, prompt, 1)
    err_bf16 = _relative_error(bf16[0], ref[0])
    # int8 adds about as much error as bf16 itself; int4 on these random weights (each group spans
    # the whole init range) about 20 %. A wrong layout or scale would be off by ~100 %.
    for mode, limit in (("int8", min(3 * err_bf16, 0.12)), ("int4", 0.45)):
        llm = LLM(str(folder), dtype="bfloat16", quantization=mode)
        attn = llm.engine.runner.model.model.layers[0].self_attn
        assert all(isinstance(m, QuantizedLinear) for m in [*attn.qkv_proj.parts, attn.o_proj])
        _, logits = greedy_with_logits(llm, prompt, 1)
        err = _relative_error(logits[0], ref[0])
        assert err < limit, mode


def test_unknown_quantization_is_a_clear_error(tiny_models):
    from sugam.errors import SugamError

    with pytest.raises(SugamError, match="unknown quantization"):
        LLM(str(tiny_models["qwen2"][0]), quantization="int3")


@pytest.mark.parametrize("kernels", ["sugam", "pytorch"])
def test_gguf_tensor_types_are_read_from_file(tmp_path, monkeypatch, kernels):
    if kernels == "sugam" and not native.available():
        pytest.skip("sugam's CPU kernels do not run on this machine")
    if kernels == "pytorch":
        monkeypatch.setattr("sugam.engine.runner.native_kernels.available", lambda: False)
    model = build_hf_model(tmp_path / "hf", "llama")
    path = tmp_path / "m.gguf"
    write_gguf(path, model, train_tokenizer(), pre="smollm", quant=QT.Q4_1)
    assert QT.Q4_1 in {t.qtype for t in GGUFFile(path).tensors.values()}
    llm = LLM(str(path), dtype="bfloat16")
    layer = llm.engine.runner.model.model.layers[0]
    if kernels == "sugam":  # every Q4_1 matrix keeps its blocks, so q, k and v fuse
        assert len(layer.self_attn.qkv_proj.parts) == 1
        assert layer.self_attn.qkv_proj.parts[0].weight_format == "packed"
        assert layer.self_attn.qkv_proj.parts[0].qtype == "Q4_1"
    else:
        # q: 64 rows, a whole int4 block; k, v: 32 rows, int8 (the int4 packing needs 64), so no fusion
        q, k, _ = layer.self_attn.qkv_proj.parts
        assert q.weight_format == "int4"
        assert k.weight_format == "int8"
    assert isinstance(layer.mlp.gate_up_proj.parts[0], QuantizedLinear)
    out = llm.generate([[5, 17, 42]], use_tqdm=False)[0].outputs[0]
    assert out.token_ids


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_sugam_quantize_writes_a_folder_that_loads_to_the_same_model(tiny_models, tmp_path, mode):
    from sugam.cli import main

    folder, _ = tiny_models["qwen2"]
    out = tmp_path / f"q-{mode}"
    assert main(["quantize", str(folder), str(out), "--quantization", mode]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    quantized_at_load = LLM(str(folder), dtype="bfloat16", quantization=mode)
    saved = LLM(str(out), dtype="bfloat16")  # no flag needed: the folder says it is quantized
    assert saved.engine.runner.quantization == mode
    assert saved.engine.runner.weight_bytes == quantized_at_load.engine.runner.weight_bytes
    prompt = [5, 17, 42, 99, 7, 3, 250, 11]
    tokens_a, logits_a = greedy_with_logits(quantized_at_load, prompt, 4)
    tokens_b, logits_b = greedy_with_logits(saved, prompt, 4)
    assert tokens_a == tokens_b
    assert all(torch.equal(a, b) for a, b in zip(logits_a, logits_b))


def test_sugam_quantize_refuses_gguf_and_requantizing(tmp_path, tiny_models, capsys):
    from sugam.cli import main

    model = build_hf_model(tmp_path / "hf", "qwen2")
    path = tmp_path / "m.gguf"
    write_gguf(path, model, train_tokenizer(), quant=QT.Q8_0)
    assert main(["quantize", str(path), str(tmp_path / "out")]) == 1
    assert "HF folders" in capsys.readouterr().err
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_models["qwen2"][0]), str(out)]) == 0
    assert main(["quantize", str(out), str(tmp_path / "again")]) == 1
    assert "already quantized" in capsys.readouterr().err


def test_bf16_kv_cache_halves_an_fp32_models_cache_and_decodes_like_it(tiny_models):
    """--kv-cache-dtype bf16 for CPUs that compute in fp32: the cache holds twice the tokens, the
    model stays fp32, and the logits move by bf16's rounding of keys and values only."""
    folder, _ = tiny_models["qwen2"]
    budget = 64 * 1024
    fp32 = LLM(str(folder), dtype="float32", kv_cache_memory=budget, block_size=8)
    half = LLM(str(folder), dtype="float32", kv_cache_memory=budget, block_size=8, kv_cache_dtype="bf16")
    assert half.engine.block_manager.num_blocks == 2 * fp32.engine.block_manager.num_blocks
    assert half.engine.runner.kv_caches[0].keys.dtype == torch.bfloat16
    assert half.engine.runner.dtype == torch.float32
    prompt = [5, 17, 42, 99, 7, 3, 250, 11, 60, 61, 62, 63]
    for llm in (fp32, half):  # later chunks and the decode steps attend to cached keys
        llm.engine.config.max_num_batched_tokens = 4
    ref_tokens, ref = greedy_with_logits(fp32, prompt, 3)
    tokens, logits = greedy_with_logits(half, prompt, 3)
    assert tokens[0] == ref_tokens[0]
    assert 0 < _relative_error(logits[1], ref[1]) < 0.03
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype must be one of auto, bf16, int8"):
        LLM(str(folder), dtype="float32", kv_cache_dtype="fp8")


def test_the_default_kv_cache_is_bf16_on_every_cpu_and_fp32_on_the_reference_path(tiny_models):
    from sugam.llm import pick_dtype

    folder, _ = tiny_models["qwen2"]
    quantized = LLM(str(folder), quantization="int8")  # fp32 compute where the CPU lacks bf16 arithmetic
    assert quantized.engine.runner.dtype == pick_dtype("auto", torch.device("cpu"), quantized=True)
    assert quantized.engine.runner.kv_caches[0].keys.dtype == torch.bfloat16
    reference = LLM(str(folder), dtype="float32")
    assert reference.engine.runner.kv_caches[0].keys.dtype == torch.float32


def test_int8_kv_cache_holds_twice_the_tokens_and_decodes_like_bf16(tiny_models):
    folder, _ = tiny_models["qwen2"]
    budget = 64 * 1024
    bf16 = LLM(str(folder), dtype="bfloat16", kv_cache_memory=budget, block_size=8)
    int8 = LLM(str(folder), dtype="bfloat16", kv_cache_memory=budget, block_size=8, kv_cache_dtype="int8")
    # head_dim 16: 2 x 16 bytes per head in bf16 vs 2 x (16 + 4) in int8
    assert int8.engine.block_manager.num_blocks == pytest.approx(bf16.engine.block_manager.num_blocks * 32 / 20, rel=0.1)
    cache = int8.engine.runner.kv_caches[0]
    assert cache.keys.dtype == torch.int8 and cache.key_scales is not None
    prompt = [5, 17, 42, 99, 7, 3, 250, 11, 60, 61, 62, 63]
    # Prefill in chunks of 4, so that later chunks and the decode steps attend to cached keys.
    exact = LLM(str(folder), dtype="float32")
    ref_tokens, ref = greedy_with_logits(exact, prompt, 3)
    errors = {}
    for name, llm in (("bf16", bf16), ("int8", int8)):
        llm.engine.config.max_num_batched_tokens = 4
        tokens, logits = greedy_with_logits(llm, prompt, 3)
        assert tokens[0] == ref_tokens[0]
        errors[name] = _relative_error(logits[0], ref[0])
    # the int8 cache adds error of the order of bf16's own (a wrong scale would be ~100 %)
    assert errors["int8"] < max(2 * errors["bf16"], 0.03), errors
    bm = int8.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_kv_cache_write_and_gather_round_trip_within_half_a_step():
    from sugam.layers.attention import KVCache

    torch.manual_seed(0)
    cache = KVCache(4, 8, 2, 16, torch.bfloat16, torch.device("cpu"), int8=True)
    k, v = torch.randn(10, 2, 16), torch.randn(10, 2, 16) * 3
    slots = torch.tensor([8, 9, 10, 11, 12, 13, 14, 15, 24, 25])  # blocks 1 and 3
    cache.write(slots, k, v)
    keys, values = cache.gather(torch.tensor([1, 3]), 10, torch.float32)
    for got, want in ((keys, k), (values, v)):
        step = want.abs().amax(-1, keepdim=True) / 127
        assert ((got - want).abs() <= step * 0.5 + 1e-6).all()


def test_head_matmul_uses_kernels_in_row_chunks_without_a_dense_copy():
    from sugam.quant.linear import _dequant_buffer, head_matmul

    torch.manual_seed(0)
    weight = quantize_int8(torch.randn(320, 64) * 0.05)
    x = torch.randn(KERNEL_MAX_ROWS * 2 + 3, 64).bfloat16()
    before = dict(_dequant_buffer._buffers)
    out = head_matmul(x, weight)
    assert _dequant_buffer._buffers == before  # no dequantized copy of the head
    # each row equals the same row computed alone (batch-invariant logits)
    for i in (0, KERNEL_MAX_ROWS, x.shape[0] - 1):
        assert torch.equal(out[i], head_matmul(x[i:i + 1], weight)[0])
    expected = x.float() @ weight.dequantize().t()
    assert (out.float() - expected).abs().max() <= 0.02 * expected.abs().max()


def test_quantized_folder_tensors_are_aligned_for_the_kernels_wherever_the_file_puts_them(tiny_models, tmp_path):
    """PyTorch's int8 kernel reads its codes with aligned vector loads; a safetensors file places tensors
    wherever its header ends (a segfault once, when a metadata string changed length)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sugam.cli import main

    folder = tmp_path / "q"
    assert main(["quantize", str(tiny_models["qwen2"][0]), str(folder), "--quantization", "int8"]) == 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    for pad in range(0, 64, 8):  # every header length modulo the 64-byte vector width
        save_file(tensors, str(folder / "model.safetensors"), metadata={**meta, "pad": "x" * pad})
        llm = LLM(str(folder), dtype="bfloat16")
        assert all(b.data_ptr() % 64 == 0 for name, b in llm.engine.runner.model.named_buffers() if name.endswith(".q"))
        assert greedy_with_logits(llm, [5, 17, 42], 2)[0]
