"""sugam's own CPU kernels for GGUF blocks: exact values, products that follow their stated numerics."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from sugam import native
from sugam.quant.formats import PackedGGUFWeight
from sugam.quant.gguf_pack import FILE_BLOCKS, pack_rows, packed_row_bytes
from sugam.quant.linear import packed_kernel_max_rows, quantized_matmul

pytestmark = pytest.mark.skipif(not native.available(), reason="sugam's CPU kernels do not run on this machine")

# where each block type keeps its fp16 scale fields (the other bytes may be anything)
FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
               "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
TYPES = list(FILE_BLOCKS)


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid GGUF rows: random codes and sub-scales, finite random fp16 scales."""
    rng = np.random.default_rng(seed)
    values, nbytes = FILE_BLOCKS[qtype]
    n = rows * cols // values
    raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    for at in FP16_FIELDS[qtype]:
        raw[:, at:at + 2] = rng.uniform(1e-3, 2e-2, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, -1)


def reference(raw: np.ndarray, qtype: str, rows: int, cols: int) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, QT[qtype]).reshape(rows, cols))


def cols_for(qtype: str) -> list[int]:
    return [256, 768] if FILE_BLOCKS[qtype][0] == 256 else [64, 192]


@pytest.mark.parametrize("qtype", TYPES)
def test_packed_rows_dequantize_exactly_to_the_gguf_reference(qtype):
    for cols in cols_for(qtype):
        raw = random_blocks(qtype, 48, cols)
        packed = torch.from_numpy(pack_rows(raw, qtype, cols))
        assert packed.shape[1] == packed_row_bytes(qtype, cols) <= raw.shape[1] * 1.03  # the file's size
        ref = reference(raw, qtype, 48, cols)
        assert torch.equal(native.gguf_dequantize(packed, qtype, cols, torch.empty(48, cols)), ref)
        bf16 = native.gguf_dequantize(packed, qtype, cols, torch.empty(48, cols, dtype=torch.bfloat16))
        assert torch.equal(bf16, ref.bfloat16())


def int8_activation_product(x: torch.Tensor, weight: torch.Tensor, block: int = 32) -> torch.Tensor:
    """What the kernel computes: x rounded to int8 per block (scale max|x|/127), times W in float64."""
    blocks = x.double().view(x.shape[0], -1, block)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks / torch.where(scale > 0, scale, torch.ones_like(scale))) * scale
    return q.view(x.shape) @ weight.double().T


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows", [1, 5])
def test_matmul_equals_its_int8_activation_math(qtype, rows):
    torch.manual_seed(0)
    cols = cols_for(qtype)[-1]
    raw = random_blocks(qtype, 40, cols, seed=1)
    packed = torch.from_numpy(pack_rows(raw, qtype, cols))
    w = reference(raw, qtype, 40, cols)
    x, bias = torch.randn(rows, cols), torch.randn(40)
    expected = int8_activation_product(x, w, native.activation_block(qtype)) + bias.double()
    got = native.gguf_matmul(x, packed, qtype, cols, bias)
    assert got.dtype == torch.float32 and got.shape == (rows, 40)
    assert ((got.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5
    # against the exact product the int8 activations cost ~0.5 % on these random weights
    exact = x.double() @ w.double().T + bias.double()
    assert ((got.double() - exact).norm() / exact.norm()).item() < 0.02
    # bf16 activations are read and written in place: the same math, rounded once at the end
    xb = x.bfloat16()
    got_bf16 = native.gguf_matmul(xb, packed, qtype, cols, bias.bfloat16())
    expected_bf16 = int8_activation_product(xb.float(), w, native.activation_block(qtype)) + bias.bfloat16().double()
    assert got_bf16.dtype == torch.bfloat16
    assert torch.allclose(got_bf16.double(), expected_bf16, rtol=1e-2, atol=1e-2 * expected_bf16.abs().max().item())


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q5_0", "Q6_K"])
@pytest.mark.parametrize("rows", [2, 5, 6, 7, 11])  # K-quants: groups of up to 6 rows, else 4 at a time
def test_each_row_gets_the_same_result_whatever_the_batch(qtype, rows):
    cols = 512
    raw = random_blocks(qtype, 64, cols)
    packed = torch.from_numpy(pack_rows(raw, qtype, cols))
    x = torch.randn(rows, cols).bfloat16()
    batch = native.gguf_matmul(x, packed, qtype, cols)
    for i in range(rows):
        assert torch.equal(native.gguf_matmul(x[i:i + 1], packed, qtype, cols)[0], batch[i])


def test_many_rows_dequantize_and_use_the_gemm():
    torch.manual_seed(0)
    cols = 192
    raw = random_blocks("Q5_0", 96, cols)
    weight = PackedGGUFWeight(torch.from_numpy(pack_rows(raw, "Q5_0", cols)), "Q5_0", cols)
    most = packed_kernel_max_rows()
    x = torch.randn(most + 7, cols).bfloat16()
    dense = (x.float() @ reference(raw, "Q5_0", 96, cols).bfloat16().float().T)
    got = quantized_matmul(x, weight).float()
    assert ((got - dense).norm() / dense.norm()).item() < 0.01
    # and the first rows alone take the kernel path: same answer up to the int8 activations
    few = quantized_matmul(x[:most], weight).float()
    assert ((few - dense[:most]).norm() / dense[:most].norm()).item() < 0.01


def test_mismatched_shapes_are_clear_errors():
    raw = random_blocks("Q8_0", 4, 64)
    packed = torch.from_numpy(pack_rows(raw, "Q8_0", 64))
    with pytest.raises(RuntimeError, match="bytes a row do not hold"):
        native.gguf_matmul(torch.randn(1, 128), packed, "Q8_0", 128)
    with pytest.raises(RuntimeError, match="x must be"):
        native.gguf_matmul(torch.randn(1, 32), packed, "Q8_0", 64)
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_rows(random_blocks("Q8_0", 1, 32), "Q8_0", 32)


def _step_logits(llm, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """The logits of every step of a greedy batch (prefill of all prompts, then decode steps of all)."""
    from sugam import SamplingParams

    captured, runner = [], llm.engine.runner
    original = runner.execute

    def capture(scheduled):
        logits = original(scheduled)
        captured.append(None if logits is None else logits.clone())
        return logits

    runner.execute = capture
    try:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True), use_tqdm=False)
    finally:
        runner.execute = original
    return captured


@pytest.mark.parametrize("case", ["qwen2", "qwen2-int8-kv", "qwen2-mixed-types", "qwen2-fp32", "qwen2-fp32-bf16-kv",
                                  "qwen3", "llama"])
def test_native_decoder_gives_the_python_layers_results_exactly(tmp_path, monkeypatch, case):
    """Decode steps through sugam/native/decoder.cpp (all layers in one call) must equal the Python
    layers bit for bit: same kernels, same ops, same rounding, for every structure it takes."""
    from conftest import build_hf_model, train_tokenizer
    from gguf_writer import write_gguf

    from sugam import LLM
    from sugam.models import native_decode

    arch = case.split("-")[0]
    shape = {} if arch == "qwen3" else {"hidden_size": 128}  # head_dim 32 (the decoder needs a multiple of 32)
    model = build_hf_model(tmp_path / "hf", arch, intermediate_size=256, **shape)
    path = tmp_path / "m.gguf"
    types = {"attn_v": QT.Q8_0} if case == "qwen2-mixed-types" else None
    write_gguf(path, model, train_tokenizer(), pre="smollm" if arch == "llama" else "qwen2",
               quant=QT.Q4_1 if arch == "llama" else QT.Q4_0, types=types)
    def load():  # fp32: the compute dtype of CPUs without native bf16, quantized weights kept
        return LLM(str(path), dtype="float32" if "fp32" in case else "bfloat16", quantization="gguf",
                   kv_cache_dtype="int8" if "int8" in case else "bf16" if "bf16-kv" in case else "auto",
                   block_size=8)

    llm = load()
    decoder = llm.engine.runner.native_decoder
    assert decoder is not None
    if case == "qwen2-mixed-types":  # v's type differs, so q|k and v are two matrices
        assert len(llm.engine.runner.model.model.layers[0].self_attn.qkv_proj.parts) == 2

    calls = []
    real = native_decode.native.decode_layers
    monkeypatch.setattr(native_decode.native, "decode_layers", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    prompts = [[5, 17, 42, 99, 7, 3, 250, 11, 60, 61], [8, 9], [30, 31, 32, 33, 34]]  # contexts cross blocks
    steps = 12
    native_logits = _step_logits(llm, prompts, steps)
    assert calls and max(calls) == len(prompts)  # the decode steps of all three went through it
    reference = load()  # a fresh engine: with the first one's prefix cache the prefill would differ
    reference.engine.runner.native_decoder = None
    python_logits = _step_logits(reference, prompts, steps)
    assert len(native_logits) == len(python_logits)
    for a, b in zip(native_logits, python_logits):  # the same functions, bf16 or fp32: the same bits
        assert (a is None and b is None) or torch.equal(a, b)


def test_native_decoder_only_where_its_kernels_apply(tmp_path):
    from conftest import build_hf_model, train_tokenizer
    from gguf_writer import write_gguf

    from sugam import LLM

    model = build_hf_model(tmp_path / "hf", "qwen2", hidden_size=128, intermediate_size=256)
    path = tmp_path / "m.gguf"
    write_gguf(path, model, train_tokenizer(), quant=QT.Q8_0)
    assert LLM(str(path), dtype="float32").engine.runner.native_decoder is None  # the exact reference path
    assert LLM(str(path), dtype="bfloat16", quantization="int8").engine.runner.native_decoder is None
    assert LLM(str(path), dtype="bfloat16").engine.runner.native_decoder is not None


def test_speculative_verification_rows_stay_on_the_native_decoder(tmp_path):
    """The k+1 rows of a speculative step are decode rows: the native decoder and the packed kernels
    take them (no dequantize + GEMM), and the greedy tokens are plain decoding's."""
    from conftest import build_hf_model, train_tokenizer
    from gguf_writer import write_gguf

    from sugam import LLM, SamplingParams

    model = build_hf_model(tmp_path / "hf", "qwen2", hidden_size=128, intermediate_size=256)
    path = tmp_path / "m.gguf"
    write_gguf(path, model, train_tokenizer(), quant=QT.Q8_0)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [[5, 17, 42, 5, 17, 42, 5], [8, 9, 8, 9]]
    expected = [o.outputs[0].token_ids for o in LLM(str(path), dtype="bfloat16").generate(prompts, params)]
    llm = LLM(str(path), dtype="bfloat16", speculative_config={"model": str(path), "num_speculative_tokens": 3})
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == expected
    engine = llm.engine
    assert engine.speculator.stats.num_accepted_tokens > 0
    # Every step after the prompts' went through the native decoder, verification rows included.
    assert engine.runner.native_decoder_steps == engine.stats().num_steps - 1


def test_native_decoder_runs_only_architectures_that_declare_it(tmp_path, monkeypatch):
    """A registered model class that does not itself declare the native decoder's layer form (here
    a subclass of Qwen2's, as a new model reusing its tensor names would be) takes the Python
    layers, even where every weight would suit the native decoder."""
    from conftest import build_hf_model, train_tokenizer
    from gguf_writer import write_gguf

    from sugam import LLM, SamplingParams
    from sugam.models import Qwen2ForCausalLM, registry

    model = build_hf_model(tmp_path / "hf", "qwen2", hidden_size=128, intermediate_size=256)
    path = tmp_path / "m.gguf"
    write_gguf(path, model, train_tokenizer(), quant=QT.Q8_0)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    declared = LLM(str(path), dtype="bfloat16")
    expected = declared.generate([[5, 17, 42]], params)[0].outputs[0].token_ids
    assert declared.engine.runner.native_decoder_steps == 5  # every decode step after the prompt

    class LookalikeModel(Qwen2ForCausalLM):
        pass

    monkeypatch.setitem(registry._MODELS, "qwen2", LookalikeModel)
    lookalike = LLM(str(path), dtype="bfloat16")
    runner = lookalike.engine.runner
    assert isinstance(runner.model, LookalikeModel) and runner.native_decoder is None
    assert lookalike.generate([[5, 17, 42]], params)[0].outputs[0].token_ids == expected
    assert runner.native_decoder_steps == 0
    assert lookalike.engine.runner.execution_path()["native_decoder"] is False


def test_small_layers_round_as_the_pytorch_ops():
    """RMSNorm, rotary and silu(gate) * up: one native call each, the values of the PyTorch ops the
    Python layers would otherwise run (the native decoder relies on it when gate and up are separate)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    x = (torch.randn(5, 256) * 3).bfloat16()
    weight = torch.randn(256).bfloat16()
    xf = x.float()
    expected = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert torch.equal(native.rms_norm(x, weight, 1e-6), expected)

    qk = torch.randn(5, 6, 64).bfloat16()
    angles = torch.randn(5, 32)
    cos, sin = torch.cat([angles, angles], -1).cos().bfloat16(), torch.cat([angles, angles], -1).sin().bfloat16()
    rotated = torch.cat((-qk[..., 32:], qk[..., :32]), dim=-1)
    assert torch.equal(native.rotary(qk, cos, sin), qk * cos[:, None] + rotated * sin[:, None])

    # the exponential is a polynomial (relative error ~1e-7), invisible after rounding to bf16 here
    gate_up = (torch.randn(64, 2 * 4096) * 4).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(native.silu_mul(gate_up), F.silu(gate) * up)


def paged_kv(lens: list[int], kv_heads: int, dim: int, cache: str, block_size: int = 16, seed: int = 0):
    """A shuffled pool of blocks holding each sequence's keys and values, with its block tables."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    blocks = sum(need) + 3
    order = torch.randperm(blocks, generator=gen)
    tables = torch.zeros(len(lens), max(need), dtype=torch.long)
    at = 0
    for i, nb in enumerate(need):
        tables[i, :nb] = order[at:at + nb]
        at += nb
    shape = (blocks, block_size, kv_heads, dim)
    if cache == "int8":
        k = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
        v = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
        ks, vs = (torch.rand(shape[:3], generator=gen) * 0.02 + 0.001 for _ in range(2))
        return k, v, ks, vs, tables
    dtype = getattr(torch, cache)
    return (torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype), None, None, tables)


def attention_reference(q, k, v, ks, vs, tables, lens, scale):
    """Each sequence's cached keys and values gathered in order, softmax attention in float64."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[2]
    for i, n in enumerate(lens):
        keys = k[tables[i]].flatten(0, 1)[:n].double()
        values = v[tables[i]].flatten(0, 1)[:n].double()
        if ks is not None:
            keys = keys * ks[tables[i]].flatten(0, 1)[:n, :, None].double()
            values = values * vs[tables[i]].flatten(0, 1)[:n, :, None].double()
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        probs = torch.softmax(torch.einsum("hd,thd->ht", q[i].double(), keys) * scale, dim=-1)
        out[i] = torch.einsum("ht,thd->hd", probs, values)
    return out


@pytest.mark.parametrize("cache", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("query", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_the_softmax_over_the_gathered_context(cache, query):
    # contexts of one token, a partial last tile, exactly one part (512), three and six parts (12 in
    # all: the 1.5B's head size then takes every KV head in one task); 14 query heads on 2 KV heads
    # (Qwen2.5-0.5B) and head size 64, 6 on 2 with 128 (the 1.5B)
    for heads, kv_heads, dim in ((14, 2, 64), (6, 2, 128)):
        lens = [1, 37, 512, 1300, 2600]
        k, v, ks, vs, tables = paged_kv(lens, kv_heads, dim, cache)
        q = torch.randn(len(lens), heads, dim).to(query)
        got = native.decode_attention(q, k, v, ks, vs, tables, torch.tensor(lens), dim ** -0.5)
        want = attention_reference(q, k, v, ks, vs, tables, lens, dim ** -0.5)
        tol = 2e-6 if query == torch.float32 else 1e-2  # fp32 arithmetic; bf16 output rounding
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("heads, dim", [(14, 64), (6, 128)])
def test_decode_attention_of_a_sequence_does_not_depend_on_its_batch_or_the_threads(heads, dim):
    # together: 14 parts, so head size 128 takes all KV heads a task; alone, one KV head a task
    lens = [3000, 700, 5, 2049]
    k, v, ks, vs, tables = paged_kv(lens, 2, dim, "bfloat16", seed=1)
    q = torch.randn(len(lens), heads, dim)
    together = native.decode_attention(q, k, v, None, None, tables, torch.tensor(lens), dim ** -0.5)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for i in range(len(lens)):
                alone = native.decode_attention(q[i:i + 1], k, v, None, None, tables[i:i + 1], torch.tensor(lens[i:i + 1]),
                                                dim ** -0.5)
                assert torch.equal(alone[0], together[i])
    finally:
        torch.set_num_threads(threads)


def test_greedy_tokens_deep_in_the_context_match_the_pytorch_attention(tmp_path, monkeypatch):
    """Decoding 1,400+ tokens deep (three of the kernel's parts) gives the tokens, and within fp32
    rounding the logits, of the PyTorch attention (gather, matmul, softmax)."""
    import random

    from conftest import build_hf_model, greedy_with_logits

    from sugam import LLM
    from sugam.layers import attention

    build_hf_model(tmp_path, "qwen2", hidden_size=128, num_attention_heads=8, max_position_embeddings=2048)
    rng = random.Random(0)
    prompt = [rng.randrange(3, 200) for _ in range(1400)]

    def greedy():
        llm = LLM(str(tmp_path), dtype="float32", max_model_len=1500, enable_prefix_caching=False)
        return greedy_with_logits(llm, prompt, 16)

    calls = []
    real = attention.native.decode_attention
    monkeypatch.setattr(attention.native, "decode_attention", lambda *a: calls.append(int(a[6].max())) or real(*a))
    tokens, logits = greedy()
    assert calls and max(calls) > 1400  # the kernel ran, at depth
    monkeypatch.setattr(attention, "NATIVE_DTYPES", ())  # the Python layers' PyTorch attention
    ref_tokens, ref_logits = greedy()
    assert tokens == ref_tokens
    assert len(logits) == len(ref_logits) == 16
    for got, want in zip(logits[1:], ref_logits[1:]):  # the decode steps
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
