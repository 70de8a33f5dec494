"""Mixture-of-experts Qwens (qwen3_moe, qwen2_moe) against transformers on tiny random models: HF
folders and GGUF files written as llama.cpp's converter writes them, fp32 and quantized; routing reads
only the chosen experts; the rest of the engine (batching, prefix cache, LoRA, tensor parallelism,
plan, Ollama details) on them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import CHATML, build_hf_model, greedy_with_logits, train_tokenizer
from gguf_writer import dequantized_copy, write_gguf, write_out

from sugam import LLM, SamplingParams
from sugam.config import ModelConfig
from sugam.errors import ModelFormatError, SugamError
from sugam.models.moe import SparseMoeBlock

QT = gguf.GGMLQuantizationType
PROMPT = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 33, 8]
STEPS = 9  # the prefill's token + 8 decode steps through the paged cache

# Layer 1 of the qwen3_moe model is dense (mlp_only_layers); qwen2_moe's decoder_sparse_step 2 makes
# layers 1 and 3 sparse, with a shared expert. Widths are multiples of 64 so the quantized files
# keep every matrix in sugam's packed kernels.
CONFIGS = {
    "qwen3_moe": dict(num_hidden_layers=3, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                      norm_topk_prob=True, mlp_only_layers=[1]),
    "qwen2_moe": dict(num_hidden_layers=4, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=64,
                      shared_expert_intermediate_size=128, decoder_sparse_step=2, norm_topk_prob=False),
}


def build_moe(folder: Path, arch: str, seed: int = 0, **overrides):
    """A random transformers MoE model (CONFIGS) saved as an HF folder; returns the fp32 model."""
    return build_hf_model(folder, arch, seed, **{**CONFIGS[arch], **overrides})


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, tuple[Path, Path, object]]:
    """{arch: (HF folder, fp32 GGUF file, transformers model)}."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for arch in CONFIGS:
        model = build_moe(root / arch, arch)
        path = root / f"{arch}.gguf"
        write_gguf(path, model, train_tokenizer(), chat_template=CHATML)
        out[arch] = (root / arch, path, model)
    return out


def reference_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """transformers' logits for each generated token (one full forward over prompt + tokens)."""
    with torch.no_grad():
        return model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]


def max_diff(logits: list[torch.Tensor], ref: torch.Tensor) -> float:
    assert len(logits) == len(ref)
    return max((a - b).abs().max().item() for a, b in zip(logits, ref))


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_logits_and_greedy_match_transformers(moe_models, arch, source):
    folder, path, model = moe_models[arch]
    llm = LLM(str(folder if source == "hf" else path), dtype="float32", block_size=4)  # the context spans blocks
    assert llm.engine.runner.native_decoder is None  # MoE layers take the Python path (models/moe.py)
    layers = llm.engine.runner.model.model.layers
    sparse = [isinstance(layer.mlp, SparseMoeBlock) for layer in layers]
    assert sparse == [model.config.num_experts > 0 and i not in model.config.mlp_only_layers
                      and (i + 1) % model.config.decoder_sparse_step == 0 for i in range(len(layers))]
    assert True in sparse and False in sparse
    tokens, logits = greedy_with_logits(llm, PROMPT, STEPS)
    ref = reference_logits(model, PROMPT, tokens)
    assert tokens == [int(r.argmax()) for r in ref]  # greedy: transformers picks the same tokens
    assert max_diff(logits, ref) <= 1e-4


def test_continuous_batching_and_prefix_cache_match_transformers(moe_models):
    """Prompts of different lengths in one batch (their tokens share the experts' matmuls), then the
    same prompts again through the prefix cache: every sequence gets transformers' greedy tokens."""
    folder, _, model = moe_models["qwen3_moe"]
    prompts = [PROMPT, [9, 8, 7], PROMPT[:5] + [200, 201, 202, 203], [60 + i for i in range(17)]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(str(folder), dtype="float32", block_size=4, max_num_seqs=4)
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    for prompt, tokens in zip(prompts, first):
        assert tokens == [int(r.argmax()) for r in reference_logits(model, prompt, tokens)]
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert again == first
    stats = llm.engine.stats()
    assert stats.prefix_cache_hit_tokens >= sum(len(p) // 4 * 4 for p in prompts) - 4 * len(prompts)


def test_speculative_decoding_keeps_greedy_tokens(moe_models):
    """Guessed tokens are verified in one step of several rows a sequence (n-gram proposals, and the
    model drafting for itself): the tokens are those of plain greedy decoding."""
    folder, _, _ = moe_models["qwen2_moe"]
    prompt = [5, 17, 42, 5, 17, 42, 5, 17, 42, 5, 17]  # repeats, so the n-gram proposer guesses
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = LLM(str(folder), dtype="float32").generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    for spec in ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1},
                 {"model": str(folder), "num_speculative_tokens": 3}):
        llm = LLM(str(folder), dtype="float32", speculative_config=spec)
        assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == plain, spec


@pytest.mark.parametrize("arch,quant", [("qwen3_moe", QT.Q8_0), ("qwen3_moe", QT.Q4_0), ("qwen2_moe", QT.Q4_0)])
def test_quantized_gguf_matches_dequantized_reference(tmp_path, arch, quant):
    """The expert blocks are sliced per expert exactly: the exact path matches transformers run on the
    file's dequantized values within 1e-4 (as the dense tests), and the default path keeps every
    expert quantized in sugam's kernels within bf16-like error of it."""
    from sugam import native

    model = build_moe(tmp_path / "hf", arch)
    path = tmp_path / "q.gguf"
    write_gguf(path, model, train_tokenizer(), quant=quant)
    assert {t.tensor_type for t in gguf.GGUFReader(str(path)).tensors if "_exps" in t.name} == {quant}
    exact = LLM(str(path), dtype="float32")
    tokens, logits = greedy_with_logits(exact, PROMPT, 5)
    ref = reference_logits(dequantized_copy(model, quant), PROMPT, tokens)
    assert max_diff(logits, ref) <= 1e-4

    kept = LLM(str(path), dtype="float32", quantization="gguf")
    runner = kept.engine.runner
    moe = next(layer.mlp for layer in runner.model.model.layers if isinstance(layer.mlp, SparseMoeBlock))
    expert = moe.experts[0].gate_up_proj.parts[0]
    assert expert.weight_format == ("packed" if native.available() else "int4" if quant != QT.Q8_0 else "int8")
    assert runner.weight_bytes < exact.engine.runner.weight_bytes / 2
    from sugam.plan import resolve_shape
    predicted = resolve_shape(str(path)).gguf_weight_bytes  # sugam plan's gguf row, 3-D expert tensors included
    print(f"plan predicts {predicted} weight bytes, the engine holds {runner.weight_bytes}")
    assert predicted == pytest.approx(runner.weight_bytes, rel=0.05)  # norms and rotary tables differ
    _, quantized = greedy_with_logits(kept, PROMPT, 1)
    _, bf16 = greedy_with_logits(LLM(str(path), dtype="bfloat16", quantization="none"), PROMPT, 1)
    # As for dense files (test_quant.py): the kept blocks err on the order of plain bf16 (the kernels
    # multiply int8 activations by the file's codes); a wrong expert slice would be off by ~100 %.
    err, err_bf16 = (((other[0] - logits[0]).norm() / logits[0].norm()).item() for other in (quantized, bf16))
    print(f"relative error of the prefill logits: kept blocks {err:.4f}, dense bf16 {err_bf16:.4f}")
    assert err < min(3 * err_bf16, 0.12)


def test_hf_folder_quantized_at_load_and_by_sugam_quantize(moe_models, tmp_path):
    """--quantization int8/int4 quantize each expert of an HF folder; `sugam quantize` writes them and
    the folder loads to the same model."""
    folder, _, model = moe_models["qwen3_moe"]
    _, ref = greedy_with_logits(LLM(str(folder), dtype="float32"), PROMPT, 1)
    _, bf16 = greedy_with_logits(LLM(str(folder), dtype="bfloat16"), PROMPT, 1)
    err_bf16 = ((bf16[0] - ref[0]).norm() / ref[0].norm()).item()
    x = torch.randn(4, model.config.hidden_size, dtype=torch.bfloat16)
    hf_expert = model.model.layers[0].mlp.experts.gate_up_proj[3]  # transformers 5: experts fused in memory
    logits = {}
    for mode in ("int8", "int4"):
        llm = LLM(str(folder), dtype="bfloat16", quantization=mode)
        expert = llm.engine.runner.model.model.layers[0].mlp.experts[3].gate_up_proj
        assert expert.parts[0].weight_format == mode
        with torch.inference_mode():
            got, want = expert(x).float(), x.float() @ hf_expert.t()
        # int4 groups of 32 span these random weights' whole range: ~8 % a matrix; a wrong slice ~100 %
        assert ((got - want).norm() / want.norm()).item() < (0.02 if mode == "int8" else 0.15), mode
        _, logits[mode] = greedy_with_logits(llm, PROMPT, 1)
    assert ((logits["int8"][0] - ref[0]).norm() / ref[0].norm()).item() < min(3 * err_bf16, 0.12)
    out = subprocess.run([sys.executable, "-m", "sugam", "quantize", str(folder), str(tmp_path / "q4"),
                          "--quantization", "int4"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    _, saved = greedy_with_logits(LLM(str(tmp_path / "q4"), dtype="bfloat16"), PROMPT, 1)
    assert torch.equal(saved[0], logits["int4"][0])


def test_decode_reads_only_the_routed_experts(tmp_path):
    """One decoding sequence: each sparse layer runs exactly its top-k experts, one row each."""
    model = build_moe(tmp_path / "hf", "qwen3_moe")
    path = tmp_path / "q.gguf"
    write_gguf(path, model, train_tokenizer(), quant=QT.Q8_0)
    llm = LLM(str(path), dtype="float32", quantization="gguf")
    runner = llm.engine.runner
    calls: list[tuple[int, int, int]] = []  # (layer, expert, rows)
    for index, layer in enumerate(runner.model.model.layers):
        if isinstance(layer.mlp, SparseMoeBlock):
            for e, expert in enumerate(layer.mlp.experts):
                expert.register_forward_pre_hook(
                    lambda _m, args, index=index, e=e: calls.append((index, e, args[0].shape[0])))
    steps: list[list[tuple[int, int, int]]] = []
    original = runner.execute

    def execute(batch):
        calls.clear()
        out = original(batch)
        steps.append(list(calls))
        return out

    runner.execute = execute
    llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    runner.execute = original
    sparse_layers = [i for i, layer in enumerate(runner.model.model.layers) if isinstance(layer.mlp, SparseMoeBlock)]
    assert len(steps) == 4
    prefill = steps[0]
    assert sum(rows for _, _, rows in prefill) == len(PROMPT) * 2 * len(sparse_layers)  # k = 2 per token
    for step in steps[1:]:
        assert sorted(step) == sorted((layer, e, 1) for layer, e, _ in step)
        for layer in sparse_layers:
            assert len({e for li, e, _ in step if li == layer}) == 2
    with pytest.raises(SugamError, match="batch invariance needs quantized matrices.*mlp.gate"):
        LLM(str(path), dtype="float32", quantization="gguf", batch_invariant=True)  # the routers are dense


def test_hf_checkpoint_with_fewer_experts_is_refused(moe_models, tmp_path):
    import shutil

    folder, _, _ = moe_models["qwen3_moe"]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_local_experts"] = cfg.pop("num_experts", cfg.get("num_local_experts")) + 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match=r"config implies \(9, 64\)"):
        LLM(str(bad), dtype="float32")
    cfg["num_experts_per_tok"] = cfg["num_local_experts"] + 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="num_experts_per_tok"):
        LLM(str(bad), dtype="float32")


def _rewrite(src: Path, dst: Path, drop: str | None = None, change: tuple[str, np.ndarray] | None = None,
             meta: dict[str, int] | None = None) -> None:
    """A copy of a GGUF file with one tensor dropped or replaced, or uint32 metadata changed."""
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if meta and key in meta:
            w.add_uint32(key, meta[key])
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    for t in reader.tensors:
        if t.name == drop:
            continue
        data = change[1] if change and t.name == change[0] else np.array(t.data)
        if t.tensor_type in (QT.F32, QT.F16):
            w.add_tensor(t.name, data)
        else:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    write_out(w)


def test_gguf_expert_tables_are_checked(moe_models, tmp_path):
    _, path, _ = moe_models["qwen3_moe"]
    from sugam.loader.gguf import open_gguf

    missing = tmp_path / "missing.gguf"
    _rewrite(path, missing, drop="blk.2.ffn_down_exps.weight")
    with pytest.raises(ModelFormatError, match="blk.2.ffn_down_exps.weight is missing"):
        open_gguf(missing)
    fewer = tmp_path / "fewer.gguf"
    reader = gguf.GGUFReader(str(path))
    up = next(t for t in reader.tensors if t.name == "blk.0.ffn_up_exps.weight")
    _rewrite(path, fewer, change=("blk.0.ffn_up_exps.weight", np.array(up.data)[:-1]))
    with pytest.raises(ModelFormatError, match=r"blk.0.ffn_up_exps.weight has shape \(7, 64, 64\)"):
        open_gguf(fewer)
    too_many = tmp_path / "used.gguf"
    _rewrite(path, too_many, meta={"qwen3moe.expert_used_count": 9})
    with pytest.raises(ModelFormatError, match="num_experts_per_tok"):
        open_gguf(too_many)
    no_count = tmp_path / "count.gguf"
    _rewrite(path, no_count, meta={"qwen3moe.expert_count": 0})
    with pytest.raises(ModelFormatError, match="expert_count must be a positive integer"):
        open_gguf(no_count)


def test_shared_expert_gate_as_a_vector_loads(moe_models, tmp_path):
    """llama.cpp declares ffn_gate_inp_shexp as [hidden]; a converter may write it [hidden, 1]: both load."""
    _, path, model = moe_models["qwen2_moe"]
    reader = gguf.GGUFReader(str(path))
    gates = {t.name: np.array(t.data) for t in reader.tensors if t.name.endswith("ffn_gate_inp_shexp.weight")}
    assert gates and all(g.shape == (1, model.config.hidden_size) for g in gates.values())
    vector = tmp_path / "vector.gguf"
    name = sorted(gates)[0]
    _rewrite(path, vector, change=(name, gates[name].reshape(-1)))
    assert next(t for t in gguf.GGUFReader(str(vector)).tensors if t.name == name).data.ndim == 1
    tokens, logits = greedy_with_logits(LLM(str(vector), dtype="float32"), PROMPT, 3)
    assert max_diff(logits, reference_logits(model, PROMPT, tokens)) <= 1e-4


def test_lora_on_attention_works_and_expert_lora_is_refused(moe_models, tmp_path):
    from safetensors.torch import save_file

    from sugam.lora.adapter import LoRARequest

    folder, _, model = moe_models["qwen3_moe"]
    cfg = model.config

    def adapter(name: str, tensors: dict[str, torch.Tensor], targets: list[str]) -> Path:
        out = tmp_path / name
        out.mkdir()
        save_file(tensors, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets, "bias": "none"}))
        return out

    torch.manual_seed(3)
    q = cfg.num_attention_heads * cfg.head_dim
    attn = adapter("attn", {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight":
                            torch.randn(shape) * 0.5
                            for i in range(cfg.num_hidden_layers)
                            for ab, shape in (("A", (4, cfg.hidden_size)), ("B", (q, 4)))}, ["q_proj"])
    experts = adapter("experts", {
        "base_model.model.model.layers.0.mlp.experts.0.gate_proj.lora_A.weight": torch.randn(4, cfg.hidden_size),
        "base_model.model.model.layers.0.mlp.experts.0.gate_proj.lora_B.weight": torch.randn(64, 4)}, ["gate_proj"])
    sparse_mlp = adapter("sparse_mlp", {
        "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight": torch.randn(4, cfg.hidden_size),
        "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight": torch.randn(cfg.intermediate_size, 4)},
        ["gate_proj"])

    llm = LLM(str(folder), dtype="float32", enable_lora=True, max_lora_rank=8)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    base = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    tuned = llm.generate([PROMPT], params, lora_request=LoRARequest("attn", 1, str(attn)),
                         use_tqdm=False)[0].outputs[0].token_ids
    # The same adapter merged into transformers' q_proj gives the same greedy tokens.
    with torch.no_grad():
        from safetensors.torch import load_file
        weights = load_file(str(attn / "adapter_model.safetensors"))
        for i, layer in enumerate(model.model.layers):
            a = weights[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"]
            b = weights[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"]
            layer.self_attn.q_proj.weight += 2.0 * b @ a
        try:
            assert tuned == [int(r.argmax()) for r in reference_logits(model, PROMPT, tuned)]
        finally:
            for i, layer in enumerate(model.model.layers):
                a = weights[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"]
                b = weights[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"]
                layer.self_attn.q_proj.weight -= 2.0 * b @ a
    assert tuned != base
    for bad, match in ((experts, "mixture-of-experts router or expert"), (sparse_mlp, "mixture-of-experts layer")):
        with pytest.raises(SugamError, match=match):
            llm.generate([PROMPT], params, lora_request=LoRARequest(bad.name, 2, str(bad)), use_tqdm=False)


def test_tensor_parallelism_is_refused_before_workers_start(moe_models):
    folder, _, _ = moe_models["qwen2_moe"]
    with pytest.raises(SugamError, match="does not split experts"):
        LLM(str(folder), dtype="float32", tensor_parallel_size=2)


def test_parameter_counts_and_plan(moe_models):
    from sugam.plan import KNOWN, model_params
    from sugam.serve.ollama import parameter_count

    for arch, (folder, _, model) in moe_models.items():
        cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
        total = sum(p.numel() for p in model.parameters())
        assert model_params(cfg)[0] == total and parameter_count(cfg) == total, arch
        c = model.config
        expert = 3 * c.hidden_size * c.moe_intermediate_size
        sparse = sum(hasattr(layer.mlp, "experts") for layer in model.model.layers)
        unused = sparse * (c.num_experts - c.num_experts_per_tok) * expert
        assert model_params(cfg)[1] == total - unused, arch
    # Qwen3-30B-A3B: published 30.5B parameters, 3.3B activated.
    shape = KNOWN["qwen3-30b-a3b"]
    assert abs(shape.params / 1e9 - 30.5) < 0.1 and abs(shape.active_params / 1e9 - 3.3) < 0.1
    out = subprocess.run([sys.executable, "-m", "sugam", "plan", "qwen3-30b-a3b", "--memory", "24GB",
                          "--bandwidth", "40"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "30.53B parameters (3.35B active per token" in out.stdout
    assert "highest precision that fits: int4" in out.stdout
    # int4 (5 bits a weight) of the 3.35B active less the 0.31B input embedding: 1.90 GB a token
    assert "expected decode: ~15 tok/s (0.7 x 40 GB/s / 1.90 GB read per token in int4)" in out.stdout


def test_ollama_show_counts_every_expert(moe_models):
    import httpx
    from server_harness import running_server

    folder, _, model = moe_models["qwen3_moe"]
    with running_server(str(folder), "--dtype", "float32", "--served-model-name", "tiny") as (base, _):
        show = httpx.post(f"{base}/api/show", json={"model": "tiny"}, timeout=30).json()
    total = sum(p.numel() for p in model.parameters())
    assert show["model_info"]["general.parameter_count"] == total
    assert show["details"]["family"] == "qwen3moe"
    assert show["model_info"]["qwen3moe.expert_count"] == 8
