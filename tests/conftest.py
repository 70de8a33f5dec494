"""Shared fixtures: tiny random models written to disk in the HF layout, with a tiny BPE tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_AND_TOOL_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "def add(a, b):\n    return a + b\n",
    "你好，世界！数字 12345 和表情 🎉🚀",
    "আমি বাংলায় গান গাই।",
    "The quick brown fox jumps over the lazy dog. " * 3,
]


def train_tokenizer(vocab_size: int = 300):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    # Added tokens that stay in the decoded text, as in Qwen's vocabulary.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_AND_TOOL_TOKENS])
    return tok


def tiny_hf_config(arch: str, vocab_size: int, **overrides):
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, initializer_range=0.3, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**{**common, "rope_theta": 10000.0, **overrides})
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(**{**common, "head_dim": 32, **overrides})
    elif arch == "llama":
        cfg = transformers.LlamaConfig(**{**common, "tie_word_embeddings": True, **overrides})
    elif arch in ("qwen3_moe", "qwen2_moe"):  # the experts and sparse layers come in the overrides
        moe_config = transformers.Qwen3MoeConfig if arch == "qwen3_moe" else transformers.Qwen2MoeConfig
        cfg = moe_config(**{**common, **overrides})
    else:
        raise ValueError(arch)
    return cfg


def build_hf_model(folder: Path, arch: str, seed: int = 0, **overrides):
    """A random transformers model saved as an HF folder sugam can load; returns the fp32 model."""
    import transformers

    tok = train_tokenizer()
    vocab = tok.get_vocab_size()
    cfg = tiny_hf_config(arch, vocab, **overrides)
    torch.manual_seed(seed)
    cls = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
           "llama": transformers.LlamaForCausalLM, "qwen3_moe": transformers.Qwen3MoeForCausalLM,
           "qwen2_moe": transformers.Qwen2MoeForCausalLM}[arch]
    model = cls(cfg).float().eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None, "add_bos_token": False}))
    return model


def forbid_tokens(model, token_ids) -> None:
    """Make `token_ids` impossible to sample from a transformers Qwen2/Llama-style model: dimension 0
    of the residual stream is set to 1 for every token and no layer writes to it, so after the final
    norm it is always positive; those tokens' output rows read it with a large negative weight.
    (Tests use it for answers that only a limit, a budget or Stop can end.)"""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
        for token in token_ids:
            model.lm_head.weight[token] = 0
            model.lm_head.weight[token, 0] = -200.0


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """{arch: (folder, transformers model)} for qwen2, qwen3 and llama."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: (root / arch, build_hf_model(root / arch, arch)) for arch in ("qwen2", "qwen3", "llama")}


def greedy_with_logits(llm, prompt_ids: list[int], steps: int, **engine_overrides) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the logits sugam sampled each of them from (prefill first, then decodes)."""
    from sugam import SamplingParams

    captured: list[torch.Tensor] = []
    runner = llm.engine.runner
    original = runner.execute

    def capture(scheduled):
        logits = original(scheduled)
        if logits is not None:
            captured.append(logits.clone())
        return logits

    runner.execute = capture
    try:
        out = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True),
                           use_tqdm=False)
    finally:
        runner.execute = original
    return out[0].outputs[0].token_ids, [c[0] for c in captured]
