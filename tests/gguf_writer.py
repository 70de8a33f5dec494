"""Writes a tiny transformers model as a GGUF file the way llama.cpp's converter does (test helper)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


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
    arch = cfg.model_type
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

    add_tokenizer(w, tokenizer, pre, chat_template)

    state = model.state_dict()
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.detach().float().numpy()
        if arch == "llama" and "self_attn.q_proj" in name:
            data = llama_permute(data, cfg.num_attention_heads)
        elif arch == "llama" and "self_attn.k_proj" in name:
            data = llama_permute(data, cfg.num_key_value_heads)
        qtype = next((t for part, t in (types or {}).items() if part in gguf_name(name)), quant)
        if qtype is not None and data.ndim == 2 and data.shape[1] % 32 == 0:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(data, dtype=np.float32))
    write_out(w)


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
        for _, p in model.named_parameters():
            data = p.detach().float().numpy()
            if data.ndim == 2 and data.shape[1] % 32 == 0:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, quant), quant)))
    return model
