"""Writes a tiny transformers model as a GGUF file the way llama.cpp's converter does (test helper)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import torch

_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    # mixture of experts (llama.cpp's Qwen2MoeModel / Qwen3MoeModel converters)
    "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "mlp.experts.gate_proj": "ffn_gate_exps",
    "mlp.experts.up_proj": "ffn_up_exps", "mlp.experts.down_proj": "ffn_down_exps",
}
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, layer, rest = hf.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{layer}.{_NAMES[module]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves the rotary halves of each Q/K head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, tokenizer, pre: str = "qwen2", chat_template: str | None = None,
               quant: gguf.GGMLQuantizationType | None = None,
               types: dict[str, gguf.GGMLQuantizationType] | None = None) -> None:
    """types: GGUF tensor-name part -> type for the matrices that differ from `quant` (e.g. {"attn_v": Q8_0})."""
    cfg = model.config
    arch = cfg.model_type.replace("_moe", "moe")  # qwen3_moe -> llama.cpp's qwen3moe
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", cfg.num_hidden_layers)
    w.add_uint32(f"{arch}.context_length", cfg.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", cfg.hidden_size)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", cfg.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_uint32(f"{arch}.attention.key_length", head_dim)
    w.add_float32(f"{arch}.rope.freq_base", float(cfg.rope_parameters["rope_theta"]))
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)

    if arch.endswith("moe"):
        w.add_uint32(f"{arch}.expert_count", cfg.num_experts)
        w.add_uint32(f"{arch}.expert_used_count", cfg.num_experts_per_tok)
        w.add_uint32(f"{arch}.expert_feed_forward_length", cfg.moe_intermediate_size)
        if arch == "qwen2moe":
            w.add_uint32(f"{arch}.expert_shared_feed_forward_length", cfg.shared_expert_intermediate_size)

    add_tokenizer(w, tokenizer, pre, chat_template)

    for name, tensor in hf_tensors(model).items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.detach().float().numpy()
        if arch == "llama" and "self_attn.q_proj" in name:
            data = llama_permute(data, cfg.num_attention_heads)
        elif arch == "llama" and "self_attn.k_proj" in name:
            data = llama_permute(data, cfg.num_key_value_heads)
        qtype = next((t for part, t in (types or {}).items() if part in gguf_name(name)), quant)
        if ".mlp.gate." in name or "shared_expert_gate" in name:
            qtype = None  # llama.cpp keeps the routers in F32
        if qtype is not None and data.ndim in (2, 3) and data.shape[-1] % 32 == 0:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(data, dtype=np.float32))
    write_out(w)


def hf_tensors(model) -> dict[str, torch.Tensor]:
    """The model's state dict in the checkpoint's names, each layer's experts stacked into one
    [experts, rows, cols] tensor per projection as llama.cpp's converter does."""
    import tempfile

    from safetensors.torch import load_file

    if not getattr(model.config, "num_experts", 0):
        return model.state_dict()
    with tempfile.TemporaryDirectory() as folder:  # transformers 5 fuses experts in memory, not in its files
        model.save_pretrained(folder)
        state: dict[str, torch.Tensor] = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            state.update(load_file(str(file)))
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name, tensor in state.items():
        match = _EXPERT.match(name)
        if match:
            experts.setdefault(match.group(1), {}).setdefault(match.group(3), {})[int(match.group(2))] = tensor
        else:
            out[name] = tensor
    for prefix, projections in experts.items():
        for proj, per_expert in projections.items():
            out[f"{prefix}.{proj}.weight"] = torch.stack([per_expert[e] for e in sorted(per_expert)])
    return out


def add_tokenizer(w: gguf.GGUFWriter, tokenizer, pre: str = "qwen2", chat_template: str | None = None) -> int:
    """The `tokenizers` BPE as GGUF tokenizer metadata (eos <|im_end|>, no BOS); returns the vocabulary size."""
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [3 if t in specials else 1 for t in tokens])
    w.add_array("tokenizer.ggml.merges", [m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_uint32("tokenizer.ggml.eos_token_id", vocab["<|im_end|>"])
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    if chat_template:
        w.add_string("tokenizer.chat_template", chat_template)
    return len(tokens)


def write_out(w: gguf.GGUFWriter) -> None:
    """Header, metadata and tensors to the file, then close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def dequantized_copy(model, quant: gguf.GGMLQuantizationType):
    """The transformers model with each quantizable matrix replaced by its quantize->dequantize round trip."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            data = p.detach().float().numpy()
            if name.endswith((".mlp.gate.weight", "shared_expert_gate.weight")):
                continue  # routers stay F32 (write_gguf)
            if data.ndim in (2, 3) and data.shape[-1] % 32 == 0:  # 3-D: an MoE layer's experts
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, quant), quant)))
    return model
