"""LoRA on the real Qwen2.5-Coder-0.5B (slow): a `peft` adapter gives the same logits in sugam as in
transformers + peft, and the same adapter exported to GGUF gives the same tokens again."""

from __future__ import annotations

import pytest
import torch

from sugam import LLM, LoRARequest, SamplingParams
from sugam.lora.adapter import load_adapter, save_gguf_lora
from sugam.registry import pull

pytestmark = pytest.mark.slow

MODEL = "qwen2.5-coder-0.5b-instruct"
CONVERSATIONS = [
    [{"role": "user", "content": "Write a Python function that returns the sum of a list."}],
    [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
]


def test_peft_adapter_on_the_real_model_matches_transformers(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = pull(MODEL, progress=False)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(ref, config).eval()
    with torch.no_grad():   # peft's non-zero init is tiny next to real weights; make the update visible
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    peft_model.save_pretrained(tmp_path / "adapter")

    llm = LLM(str(path), dtype="float32", enable_lora=True)
    adapter = LoRARequest("random", 1, str(tmp_path / "adapter"))
    prompts = [llm.chat_prompt(c) for c in CONVERSATIONS]
    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_tokens=12, ignore_eos=True)
    captured, original = [], llm.engine.runner.execute
    llm.engine.runner.execute = lambda batch: captured.append(original(batch)) or captured[-1]
    outs = [llm.generate([p], params, lora_request=adapter)[0].outputs[0].token_ids for p in prompts]
    llm.engine.runner.execute = original
    base = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs != base  # the adapter changes what the model says

    step = 0
    for prompt, tokens in zip(prompts, outs):
        with torch.no_grad():
            ref_logits = peft_model(input_ids=torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
        assert tokens == ref_logits.argmax(-1).tolist()  # transformers + peft's greedy choices
        for i in range(len(tokens)):
            diff = (captured[step][0] - ref_logits[i]).abs().max().item()
            assert diff <= 1e-3, f"token {i}: max abs logit difference {diff}"
            step += 1

    save_gguf_lora(load_adapter(tmp_path / "adapter"), tmp_path / "adapter.gguf", llm.engine.model_config)
    from_gguf = LoRARequest("random-gguf", 2, str(tmp_path / "adapter.gguf"))
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, lora_request=from_gguf)] == outs

    # The default quantized path (packed GGUF kernels, native decoder) runs the adapter too.
    quantized = LLM(MODEL, enable_lora=True)
    q_outs = [o.outputs[0].token_ids for o in quantized.generate(prompts, params, lora_request=adapter)]
    assert quantized.engine.runner.native_decoder_steps > 0
    assert sum(a == b for x, y in zip(q_outs, outs) for a, b in zip(x, y)) >= 0.75 * sum(map(len, outs))
