"""sugam's transformer against transformers' on tiny random models, in fp32: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import build_hf_model, greedy_with_logits

from sugam import LLM, SamplingParams

PROMPT = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 33, 8]
STEPS = 21  # the prefill's token + 20 decode steps through the paged cache


def hf_reference(model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                                   min_new_tokens=steps, pad_token_id=0)
        tokens = generated[0, len(prompt):].tolist()
        logits = model(generated[:, :-1]).logits[0, len(prompt) - 1:]
    return tokens, logits


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_logits_and_greedy_match_transformers(tiny_models, arch):
    folder, model = tiny_models[arch]
    llm = LLM(str(folder), dtype="float32", block_size=4)  # small blocks: the context spans many
    tokens, logits = greedy_with_logits(llm, PROMPT, STEPS)
    ref_tokens, ref_logits = hf_reference(model, PROMPT, STEPS)
    assert tokens == ref_tokens
    assert len(logits) == STEPS
    for step, (ours, ref) in enumerate(zip(logits, ref_logits)):
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-4, f"step {step}: max abs logit difference {diff}"


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    arch = "llama" if scaling["rope_type"] == "llama3" else "qwen2"
    params = {**scaling, "rope_theta": 10000.0}
    model = build_hf_model(tmp_path / "m", arch, seed=1, rope_parameters=params)
    llm = LLM(str(tmp_path / "m"), dtype="float32")
    tokens, logits = greedy_with_logits(llm, PROMPT, 8)
    ref_tokens, ref_logits = hf_reference(model, PROMPT, 8)
    assert tokens == ref_tokens
    assert max((a - b).abs().max().item() for a, b in zip(logits, ref_logits)) <= 1e-4


def test_transformers_4_config_spelling(tmp_path, tiny_models):
    """Real checkpoints write torch_dtype / rope_theta / rope_scaling; transformers 5 writes dtype / rope_parameters."""
    import json
    import shutil

    folder, model = tiny_models["qwen2"]
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    cfg = json.loads((old / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg.pop("dtype", None)
    cfg.update(torch_dtype="float32", rope_theta=params["rope_theta"], rope_scaling=None)
    (old / "config.json").write_text(json.dumps(cfg))
    a = LLM(str(folder), dtype="float32").generate([PROMPT], SamplingParams(temperature=0, max_tokens=8))
    b = LLM(str(old), dtype="float32").generate([PROMPT], SamplingParams(temperature=0, max_tokens=8))
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


def test_batched_chunked_and_preempted_runs_match_single(tiny_models):
    """One batch of many prompts, forced prompt chunking, or a KV pool so small that sequences are
    preempted and recomputed: every prompt still gets exactly the tokens it gets alone."""
    folder, _ = tiny_models["qwen2"]
    prompts = [[(7 * i + j) % 290 + 3 for j in range(5 + 3 * i)] for i in range(16)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    single = LLM(str(folder), dtype="float32")
    alone = [single.generate([p], params)[0].outputs[0].token_ids for p in prompts]

    batched = LLM(str(folder), dtype="float32").generate(prompts, params)
    assert [o.outputs[0].token_ids for o in batched] == alone

    chunked = LLM(str(folder), dtype="float32", max_num_batched_tokens=4).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in chunked] == alone

    per_token = 2 * 2 * 2 * 16 * 4  # layers * (k, v) * kv_heads * head_dim * fp32 bytes
    small = LLM(str(folder), dtype="float32", block_size=4, kv_cache_memory=per_token * 96)
    preempted = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in preempted] == alone
    assert small.engine.block_manager.num_free_blocks == small.engine.block_manager.num_blocks
