"""The transformer of Qwen2 / Qwen2.5 / QwQ / DeepSeek-R1-Distill-Qwen, with Qwen3 and Llama as flags.

Module names are those of the HF checkpoints (model.layers.N.self_attn.q_proj, ...) so that
safetensors weights load by name and GGUF tensors need only a name table.

Qwen3 differs by an RMSNorm over each query and key head before the rotary embedding and an
explicit head_dim; Llama has no QKV bias (optionally bias everywhere) and may tie the LM head.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..config import ModelConfig
from ..errors import ModelFormatError
from ..layers.attention import AttentionMetadata, KVCache, paged_attention
from ..layers.projection import ProjectionGroup
from ..layers.rmsnorm import NATIVE_DTYPES, RMSNorm
from ..layers.rotary import RotaryEmbedding, apply_rotary
from ..quant import Int4Weight, Int8Weight, QuantizedEmbedding, QuantizedLinear, QuantizedWeight
from ..quant.formats import GGUFRows, PackedGGUFWeight
from ..quant.linear import GGUFRowEmbedding, head_matmul
from .native_decode import NATIVE_DECODER_LAYER, NativeDecoder
from .registry import register_model

if TYPE_CHECKING:
    from ..loader.base import LoadedWeight

log = logging.getLogger(__name__)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.rotary = rotary
        self.scale = self.head_dim ** -0.5

    def fuse_projections(self) -> None:
        """After loading: q, k and v become one group (one matmul where their formats match)."""
        self.qkv_proj = ProjectionGroup([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        qk, v = self.qkv_proj(x).split([(heads + kv_heads) * dim, kv_heads * dim], dim=-1)
        qk = qk.view(tokens, heads + kv_heads, dim)
        v = v.view(tokens, kv_heads, dim)
        if self.qk_norm:
            q, k = qk.split([heads, kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        q, k = apply_rotary(qk, cos, sin).split([heads, kv_heads], dim=1)  # one rotation for both
        out = paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(tokens, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, width: int | None = None):
        """`width`: the intermediate size when not the config's (an expert's, models/moe.py)."""
        super().__init__()
        width = width or cfg.intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=cfg.mlp_bias)

    def fuse_projections(self) -> None:
        self.gate_up_proj = ProjectionGroup([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if gate_up.dtype in NATIVE_DTYPES and gate_up.is_cpu and gate_up.shape[-1] % 32 == 0 and native.available():
            return self.down_proj(native.silu_mul(gate_up))  # one call instead of three ops
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """forward(): flattened tokens of many sequences -> final hidden states; compute_logits() on the rows wanted.

    Architectures subclass it and are registered in models/registry.py. A class that computes its
    layers exactly as sugam's native decoder does says so itself with `native_decoder_layer =
    NATIVE_DECODER_LAYER` (the declaration is not inherited: a subclass that changes the math must
    not run on the native path by accident)."""

    native_decoder_layer: ClassVar[str | None] = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # Shared by all layers; a buffer, so it follows .to(device).
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.model = Backbone(cfg, self.rotary)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @classmethod
    def declares_native_decoder(cls) -> bool:
        return cls.__dict__.get("native_decoder_layer") == NATIVE_DECODER_LAYER

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, native_decoder: NativeDecoder | None = None) -> torch.Tensor:
        """`native_decoder`: run the layers through it (the runner passes it for the steps it takes)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        if native_decoder is not None:
            x = native_decoder(x, cos, sin, kv_caches, meta)  # the same layers, from C++
        else:
            for layer, kv_cache in zip(self.model.layers, kv_caches):
                x = layer(x, cos, sin, kv_cache, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        if isinstance(head, (QuantizedLinear, QuantizedEmbedding)):
            return head_matmul(hidden, head.quantized_weight).float()
        return F.linear(hidden, head.weight).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, LoadedWeight]]) -> None:
        """Copy named tensors into the parameters; every parameter must be filled exactly once.

        A quantized weight replaces its nn.Linear (or the embedding) by the quantized module.
        """
        params = dict(self.named_parameters())
        missing = set(params)
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied checkpoints may still store the head; the embedding is used
            param = params.get(name)
            if param is None:
                if not name.endswith("rotary_emb.inv_freq"):
                    log.warning("ignoring unexpected tensor %s", name)
                continue
            if tuple(tensor.shape) != tuple(param.shape):
                raise ModelFormatError(f"tensor {name} has shape {tuple(tensor.shape)}, "
                                       f"the config implies {tuple(param.shape)}")
            if isinstance(tensor, (Int8Weight, Int4Weight, PackedGGUFWeight, GGUFRows)):
                self._install_quantized(name, tensor, param.dtype)
            else:
                param.copy_(tensor)
            missing.discard(name)
        if missing:
            shown = ", ".join(sorted(missing)[:5])
            raise ModelFormatError(f"checkpoint lacks {len(missing)} tensors the config needs, e.g. {shown}")

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Merge the q/k/v and gate/up matrices (call after load_weights; names then differ from HF's)."""
        layer: Any   # nn.ModuleList yields nn.Module: a DecoderLayer here
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def _install_quantized(self, name: str, weight: QuantizedWeight | GGUFRows, dtype: torch.dtype) -> None:
        module_name = name.removesuffix(".weight")
        parent_name, _, child = module_name.rpartition(".")
        parent = self.get_submodule(parent_name) if parent_name else self
        old = getattr(parent, child)
        device = old.weight.device
        if isinstance(weight, GGUFRows) and isinstance(old, nn.Embedding):
            setattr(parent, child, GGUFRowEmbedding(weight, dtype))  # looked up on the CPU
            return
        # (replace() of a union is beyond mypy; `moved` is of weight's class)
        moved = dataclasses.replace(weight, **{k: v.to(device) for k, v in weight.tensors().items()})  # type: ignore[arg-type]
        if isinstance(old, nn.Embedding):
            if not isinstance(weight, Int8Weight):
                raise ModelFormatError(f"{name}: the embedding must be int8, got {type(weight).__name__}")
            setattr(parent, child, QuantizedEmbedding(moved, dtype))  # type: ignore[arg-type]  # an Int8Weight
        elif isinstance(old, nn.Linear):
            # The bias keeps its Parameter object, so a bias loaded after the weight still lands.
            # (GGUFRows: the weight chooser keeps file rows for embeddings only.)
            setattr(parent, child, QuantizedLinear(moved, old.bias))  # type: ignore[arg-type]
        else:
            raise ModelFormatError(f"{name}: cannot hold a quantized weight")


@register_model("qwen2")
class Qwen2ForCausalLM(CausalLM):
    """Qwen2 / Qwen2.5 / QwQ / DeepSeek-R1-Distill-Qwen: QKV bias."""
    native_decoder_layer = NATIVE_DECODER_LAYER


@register_model("qwen3")
class Qwen3ForCausalLM(CausalLM):
    """Qwen3: RMSNorm over each query and key head, explicit head_dim."""
    native_decoder_layer = NATIVE_DECODER_LAYER


@register_model("llama")
class LlamaForCausalLM(CausalLM):
    """Llama and Mistral-style dense models: no QKV bias (optionally bias everywhere)."""
    native_decoder_layer = NATIVE_DECODER_LAYER
