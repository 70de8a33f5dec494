"""Decode steps through sugam's native decoder (sugam/native/decoder.cpp): all layers in one call.

A decode step of a 1.5B model makes ~400 small calls around its ~120 matrix products; from Python
their dispatch cost ~5 ms a token, 15 % of the step. The native decoder runs the same operations
from C++, with the same kernels and rounding, so its output equals the Python layers' exactly.

It computes one form of layer, NATIVE_DECODER_LAYER, and runs a model only if the model's class
declares that form (see CausalLM), every projection is a packed GGUF matrix (sugam's kernels), the
model is bf16 or fp32 on a CPU that runs the kernels (any of their builds), and every sequence of
the step brings one token (at most packed_kernel_max_rows() of them: larger batches are faster
through dequantize + GEMM). The runner makes that choice per step; anything else takes the
Python layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .. import native
from ..layers.attention import AttentionMetadata, KVCache
from ..layers.lora import LoRAProjection, unwrap
from ..quant.linear import QuantizedLinear, packed_kernel_max_rows

if TYPE_CHECKING:
    from .qwen2 import CausalLM

# The layer decoder.cpp computes: pre-norm RMSNorm; q|k|v projections (optional bias); optional
# RMSNorm of each q and k head; NeoX-style rotary from the given cos/sin; grouped-query attention
# over the paged cache; o projection; residual; RMSNorm; SiLU(gate) * up; down; residual.
NATIVE_DECODER_LAYER = "rmsnorm-gqa-rotary-swiglu/1"


# A layer is typed Any here: its projections are swapped at load (quantized, LoRA-wrapped), so what
# each attribute holds is known only at run time (and nn.Module's attributes type as Tensor | Module).
def _layer_matrices(layer: Any) -> list[Any]:
    """The layer's projections in decoder.cpp's slots: q|k|v as one, two (q|k, v) or three matrices,
    then o, gate|up as one or two, down."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv_group: Any = unwrap(attn.qkv_proj)   # ProjectionGroups (layers/projection.py)
    gate_up_group: Any = unwrap(mlp.gate_up_proj)
    qkv, gate_up = list(qkv_group.parts), list(gate_up_group.parts)
    return (qkv + [None] * (3 - len(qkv)) + [unwrap(attn.o_proj)] + gate_up + [None] * (2 - len(gate_up))
            + [unwrap(mlp.down_proj)])


def _lora_wrappers(layer: Any) -> list[LoRAProjection] | None:
    """The layer's LoRA wrappers in decoder.cpp's group order (q|k|v, o, gate|up, down), or None."""
    attn, mlp = layer.self_attn, layer.mlp
    wrappers = [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
    return wrappers if all(isinstance(w, LoRAProjection) for w in wrappers) else None


class NativeDecoder:
    """The model's layers as the flat lists decoder.cpp reads; built once after loading."""

    def __init__(self, model: CausalLM):
        cfg = model.config
        self.dtype = next(model.parameters()).dtype
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.intermediate, self.eps = cfg.intermediate_size, cfg.rms_norm_eps
        self.scale = cfg.head_dim ** -0.5
        self.matrices, self.qtypes, self.biases, self.norms = [], [], [], []
        self.lora_a, self.lora_b = [], []
        self.lora_batch = None   # LoRA slots (layers/lora.py): the step's groups are read from it
        self.lora_max_rank = 1
        layer: Any   # see _layer_matrices
        for layer in model.model.layers:
            wrappers = _lora_wrappers(layer)
            if wrappers is not None:
                self.lora_a += [w.lora_a for w in wrappers]
                self.lora_b += [w.lora_b for w in wrappers]
                self.lora_batch, self.lora_max_rank = wrappers[0].batch, wrappers[0].max_rank
            for m in _layer_matrices(layer):
                self.matrices.append(None if m is None else m.packed)
                self.qtypes.append(0 if m is None else native.ggml_type_id(m.qtype))
                self.biases.append(None if m is None else m.bias)
            attn = layer.self_attn
            self.norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                           attn.q_norm.weight if attn.qk_norm else None, attn.k_norm.weight if attn.qk_norm else None]

    @classmethod
    def build(cls, model: CausalLM) -> NativeDecoder | None:
        """A decoder for this model, or None where the native decoder cannot run it."""
        if not type(model).declares_native_decoder():
            return None
        cfg = model.config
        params = list(model.parameters())
        if (not params or params[0].dtype not in (torch.bfloat16, torch.float32) or not params[0].is_cpu
                or not native.available()):
            return None
        if cfg.head_dim % 32 or cfg.hidden_size % 16:
            return None
        for layer in model.model.layers:
            for m in _layer_matrices(layer):
                if m is not None and not (isinstance(m, QuantizedLinear) and m.weight_format == "packed"):
                    return None
        return cls(model)

    def runs(self, tokens: int, meta: AttentionMetadata, any_size: bool = False) -> bool:
        """Whether a step is one the native decoder takes (one new token per sequence; `any_size`:
        however many, as batch invariance keeps every decode row on the kernels)."""
        return (meta.decode_tokens is not None and len(meta.decode_tokens) == tokens
                and (any_size or tokens <= packed_kernel_max_rows(self.dtype)))

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches: list[KVCache],
                 meta: AttentionMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        return native.decode_layers(
            x.contiguous(), cos.reshape(tokens, -1), sin.reshape(tokens, -1),
            self.matrices, self.qtypes, self.biases, self.norms,
            [c.keys for c in kv_caches], [c.values for c in kv_caches],
            [c.key_scales for c in kv_caches], [c.value_scales for c in kv_caches],
            meta.slot_mapping, meta.decode_tables, meta.decode_lens,  # type: ignore[arg-type]  # set: runs() took the step
            self.heads, self.kv_heads, self.intermediate, self.eps, self.scale,
            self.lora_a, self.lora_b, self.lora_batch.groups if self.lora_batch is not None else None,
            self.lora_max_rank)
