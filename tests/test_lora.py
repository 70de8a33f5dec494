"""LoRA serving: adapters made by `peft` give transformers + peft's logits; adapters of a batch do
not leak into each other; the native decoder applies them exactly; files are checked before use."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import build_hf_model, train_tokenizer

from sugam import LLM, LoRARequest, SamplingParams
from sugam.lora.adapter import LoRAError, load_adapter, save_gguf_lora

PROMPT = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 33, 8]
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(model, folder, seed: int, rank: int = 4, alpha: float = 8, targets=None, **extra):
    """A peft adapter with random non-zero A and B (peft's init_lora_weights=False); returns the peft model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or ALL_MODULES, init_lora_weights=False,
                        lora_dropout=0.0, **extra)
    peft_model = get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():  # peft's random init leaves B small; make the update large enough to matter
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(folder)
    return peft_model


def reference(model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                                   min_new_tokens=steps, pad_token_id=0)
        tokens = generated[0, len(prompt):].tolist()
        logits = model(input_ids=generated[:, :-1]).logits[0, len(prompt) - 1:]
    return tokens, logits


def greedy(llm, prompts, steps, loras, capture=False):
    captured, runner = [], llm.engine.runner
    original = runner.execute
    if capture:
        runner.execute = lambda batch: captured.append(original(batch)) or captured[-1]
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True),
                            use_tqdm=False, lora_request=loras)
    finally:
        runner.execute = original
    return [o.outputs[0].token_ids for o in outs], captured


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_peft_adapter_gives_the_logits_of_transformers_with_peft(tmp_path, tiny_models, arch):
    folder, model = tiny_models[arch]
    peft_model = make_peft_adapter(model, tmp_path / "adapter", seed=1)
    ref_tokens, ref_logits = reference(peft_model, PROMPT, 12)
    base_tokens, _ = reference(model, PROMPT, 12)
    assert ref_tokens != base_tokens  # the adapter changes the answer, so the test can fail

    llm = LLM(str(folder), dtype="float32", block_size=4, enable_lora=True)
    (tokens,), captured = greedy(llm, [PROMPT], 12, LoRARequest("mine", 1, str(tmp_path / "adapter")), capture=True)
    assert tokens == ref_tokens
    for step, (ours, ref) in enumerate(zip(captured, ref_logits)):
        diff = (ours[0] - ref).abs().max().item()
        assert diff <= 1e-4, f"step {step}: max abs logit difference {diff}"
    # the same engine still serves the base model
    (plain,), _ = greedy(llm, [PROMPT], 12, None)
    assert plain == base_tokens


def test_rslora_and_partial_targets(tmp_path, tiny_models):
    folder, model = tiny_models["qwen2"]
    peft_model = make_peft_adapter(model, tmp_path / "a", seed=2, rank=6, alpha=3, targets=["q_proj", "v_proj", "down_proj"],
                                   use_rslora=True)
    ref_tokens, _ = reference(peft_model, PROMPT, 10)
    llm = LLM(str(folder), dtype="float32", enable_lora=True)
    (tokens,), _ = greedy(llm, [PROMPT], 10, LoRARequest("a", 1, str(tmp_path / "a")))
    assert tokens == ref_tokens


@pytest.mark.parametrize("max_loras", [4, 2])
def test_mixed_batch_of_adapters_equals_each_request_alone(tmp_path, tiny_models, max_loras):
    """8 requests over the base and three adapters in one batch == each alone; with 2 slots the
    scheduler holds back requests whose adapter has no slot, and the answers stay the same."""
    folder, model = tiny_models["qwen2"]
    requests = []
    for i in range(3):
        make_peft_adapter(model, tmp_path / f"a{i}", seed=10 + i)
        requests.append(LoRARequest(f"a{i}", i + 1, str(tmp_path / f"a{i}")))
    # the same prompt under every adapter: the prefix cache must not share blocks between them
    prompts = [PROMPT, PROMPT, PROMPT, PROMPT, PROMPT[:7], PROMPT[2:], [9, 8, 7, 6, 5], PROMPT[:7]]
    loras = [None, requests[0], requests[1], requests[2], requests[0], None, requests[2], requests[1]]

    alone_llm = LLM(str(folder), dtype="float32", enable_lora=True)
    alone = [greedy(alone_llm, [p], 10, lora)[0][0] for p, lora in zip(prompts, loras)]
    assert len({tuple(t) for t in alone[:4]}) == 4  # base and the three adapters answer differently

    llm = LLM(str(folder), dtype="float32", enable_lora=True, max_loras=max_loras)
    seen_groups = []
    original = llm.engine.runner.execute
    llm.engine.runner.execute = lambda batch: seen_groups.append(len(batch.lora_groups)) or original(batch)
    batched, _ = greedy(llm, prompts, 10, loras)
    assert batched == alone
    assert max(seen_groups) == min(3, max_loras)  # adapters really shared steps, never more than the slots
    assert llm.engine.block_manager.num_used_blocks == 0


def test_gguf_export_gives_the_same_tokens(tmp_path, tiny_models):
    folder, model = tiny_models["llama"]   # llama: q/k rows are permuted in GGUF files, and back
    make_peft_adapter(model, tmp_path / "peft", seed=3)
    adapter = load_adapter(tmp_path / "peft")
    llm = LLM(str(folder), dtype="float32", enable_lora=True)
    save_gguf_lora(adapter, tmp_path / "a.gguf", llm.engine.model_config)
    from_gguf = load_adapter(tmp_path / "a.gguf")
    assert from_gguf.architecture == "llama"
    for key, w in adapter.weights.items():
        assert torch.equal(from_gguf.weights[key].a, w.a) and torch.equal(from_gguf.weights[key].b, w.b)
        assert from_gguf.weights[key].scale == pytest.approx(w.scale)
    (peft_tokens, gguf_tokens), _ = greedy(llm, [PROMPT, PROMPT], 10,
                                           [LoRARequest("peft", 1, str(tmp_path / "peft")),
                                            LoRARequest("gguf", 2, str(tmp_path / "a.gguf"))])
    assert peft_tokens == gguf_tokens


def test_native_decoder_applies_adapters_exactly(tmp_path):
    """Decode steps with adapters through decoder.cpp equal the Python layers' bit for bit."""
    from gguf import GGMLQuantizationType as QT
    from gguf_writer import write_gguf

    model = build_hf_model(tmp_path / "hf", "qwen2", intermediate_size=256, hidden_size=128)
    path = tmp_path / "m.gguf"
    write_gguf(path, model, train_tokenizer(), quant=QT.Q4_0)
    loras = []
    for i in range(2):
        make_peft_adapter(model, tmp_path / f"a{i}", seed=20 + i)
        loras.append(LoRARequest(f"a{i}", i + 1, str(tmp_path / f"a{i}")))

    def load():
        return LLM(str(path), dtype="bfloat16", quantization="gguf", enable_lora=True, block_size=8)

    llm = load()
    if llm.engine.runner.native_decoder is None:
        pytest.skip("sugam's native kernels do not run here")
    prompts = [[5, 17, 42, 99, 7, 3, 250, 11, 60, 61], [8, 9], [30, 31, 32, 33, 34], [8, 9]]
    per_prompt = [loras[0], None, loras[1], loras[0]]
    tokens, native_logits = greedy(llm, prompts, 8, per_prompt, capture=True)
    assert llm.engine.runner.native_decoder_steps >= 7
    reference_llm = load()
    reference_llm.engine.runner.native_decoder = None
    ref_tokens, python_logits = greedy(reference_llm, prompts, 8, per_prompt, capture=True)
    assert tokens == ref_tokens
    for a, b in zip(native_logits, python_logits):
        assert (a is None and b is None) or torch.equal(a, b)


def test_bad_adapters_are_refused_with_the_reason(tmp_path, tiny_models):
    folder, model = tiny_models["qwen2"]
    llm = LLM(str(folder), dtype="float32", enable_lora=True, max_lora_rank=8)
    engine = llm.engine

    make_peft_adapter(model, tmp_path / "wide", seed=4, rank=16)
    with pytest.raises(LoRAError, match="rank 16 is above the limit --max-lora-rank 8"):
        engine.add_lora(LoRARequest("wide", 1, str(tmp_path / "wide")))

    other = build_hf_model(tmp_path / "other", "qwen2", hidden_size=96)
    make_peft_adapter(other, tmp_path / "other_adapter", seed=5)
    with pytest.raises(LoRAError, match=r"lora_A .* do not fit the model.s \d+x\d+ matrix"):
        engine.add_lora(LoRARequest("other", 2, str(tmp_path / "other_adapter")))

    llama_folder, llama = tiny_models["llama"]
    make_peft_adapter(llama, tmp_path / "llama_peft", seed=6)
    save_gguf_lora(load_adapter(tmp_path / "llama_peft"), tmp_path / "llama.gguf",
                   LLM(str(llama_folder), dtype="float32").engine.model_config)
    with pytest.raises(LoRAError, match="architecture 'llama', the model is 'qwen2'"):
        engine.add_lora(LoRARequest("llama", 3, str(tmp_path / "llama.gguf")))

    pickle_only = tmp_path / "pickle_only"
    pickle_only.mkdir()
    (pickle_only / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (pickle_only / "adapter_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(LoRAError, match="pickle, which sugam never loads"):
        engine.add_lora(LoRARequest("pickle", 4, str(pickle_only)))

    with pytest.raises(LoRAError, match="no adapter at"):
        engine.add_lora(LoRARequest("missing", 5, str(tmp_path / "nowhere")))
    assert engine.list_loras() == []          # nothing half-loaded
    with pytest.raises(LoRAError, match="LoRA adapters are off"):
        LLM(str(folder), dtype="float32").generate([PROMPT], lora_request=LoRARequest("x", 1, str(tmp_path / "wide")))


def test_unloading_lets_running_requests_finish(tmp_path, tiny_models):
    folder, model = tiny_models["qwen2"]
    make_peft_adapter(model, tmp_path / "a", seed=7)
    request = LoRARequest("a", 1, str(tmp_path / "a"))
    llm = LLM(str(folder), dtype="float32", enable_lora=True)
    (expected,), _ = greedy(llm, [PROMPT], 8, request)
    engine = llm.engine
    seq = engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), lora_request=request)
    engine.step()
    assert engine.scheduler.counts().running_loras == ("a",)
    assert engine.remove_lora("a") and engine.list_loras() == []
    while engine.has_unfinished():
        engine.step()
    assert seq.output_token_ids == expected
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])   # 40: above the kernel's row limit, PyTorch's GEMMs
def test_native_lora_update_equals_the_pytorch_ops(dtype, rows):
    from sugam import native
    from sugam.layers.lora import apply_lora

    if not native.available():
        pytest.skip("sugam's native kernels do not run here")
    gen = torch.Generator().manual_seed(rows)
    slots, max_rank, parts, inp, out = 3, 8, 3, 96, 80
    a = torch.randn(slots, max_rank * parts, inp, generator=gen).to(dtype)
    bt = torch.randn(slots, max_rank * parts, out, generator=gen).to(dtype)
    x = torch.randn(rows, inp, generator=gen).to(dtype)
    y = torch.randn(rows, out, generator=gen).to(dtype)
    half = torch.arange(0, rows, 2)
    groups = [(2, None, 8)] if rows == 1 else [(0, half, 3), (2, torch.arange(1, rows, 2), 8)]
    expected = apply_lora(x.float(), y.float().clone(), a.float(), bt.float(), groups, parts)
    got = y.clone()
    native.lora_add(got, x, a, bt, groups, max_rank)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert (got.float() - expected).abs().max() <= tolerance * expected.abs().max()
    assert not torch.equal(got, y)


def test_export_command_writes_a_gguf_adapter_that_serves_the_same(tmp_path, tiny_models):
    from sugam.cli import main

    folder, model = tiny_models["qwen2"]
    make_peft_adapter(model, tmp_path / "peft", seed=8)
    assert main(["export", str(tmp_path / "peft"), "--gguf", str(tmp_path / "a.gguf"), "--model", str(folder)]) == 0
    llm = LLM(str(folder), dtype="float32", enable_lora=True)
    (a, b), _ = greedy(llm, [PROMPT, PROMPT], 8, [LoRARequest("peft", 1, str(tmp_path / "peft")),
                                                  LoRARequest("gguf", 2, str(tmp_path / "a.gguf"))])
    assert a == b
    # an adapter that does not name its base needs --model
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    assert main(["export", str(tmp_path / "peft"), "--gguf", str(tmp_path / "b.gguf")]) == 1
