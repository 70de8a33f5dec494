"""The model as `sugam finetune` trains it: a frozen base in its own form, LoRA on chosen projections,
and a batched causal forward that autograd can differentiate.

- The base loads as the engine's runner loads it (same quantization policy: a GGUF keeps its blocks on
  the CPU, QLoRA-style), but its projections stay separate (no fuse_projections): LoRA wraps each.
- A frozen projection's product goes through `_FrozenProduct`: forward runs the module whatever its
  format (sugam's packed-GGUF kernels and PyTorch's int8/int4 kernels have no autograd), backward gives
  only the input's gradient, grad_y @ W, with W dequantized a row chunk at a time for that one product.
- The forward is written here, over [batch, seq] with SDPA (GQA, padding mask), from the model's own
  modules and weights. RMSNorm, rotary and silu*mul are computed with PyTorch ops: their bf16 fast
  paths are sugam kernels without autograd.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import native
from ..layers.rmsnorm import RMSNorm
from ..loader import open_checkpoint
from ..loader.base import LoadedCheckpoint
from ..models.qwen2 import CausalLM, DecoderLayer
from ..models.registry import model_class
from ..quant.formats import INT4_ROW_BLOCK, PackedGGUFWeight, QuantizedWeight
from ..quant.linear import DEQUANT_CHUNK_VALUES, QuantizedEmbedding, QuantizedLinear, quantized_matmul
from ..quant.policy import checkpoint_mode, weight_chooser
from .adapter import PROJECTION_PARENT, TARGET_MODULES, LoRAAdapter, LoRAError, LoRAWeights, lora_scale
from .data import IGNORE

# Logits of this many values (fp32) at most exist at once in the loss: a 150k vocabulary -> ~220 rows.
LOSS_CHUNK_VALUES = 1 << 25


# --- loading ---------------------------------------------------------------------------------------

def load_base(path: Path, device: torch.device, dtype: torch.dtype, quantization: str = "auto",
              checkpoint_file: LoadedCheckpoint | None = None) -> tuple[CausalLM, str]:
    """(frozen model, quantization mode), built as ModelRunner builds it but left unfused."""
    ckpt = checkpoint_file or open_checkpoint(path)
    cfg = ckpt.config
    if cfg.is_moe:
        raise LoRAError(f"{path}: fine-tuning a mixture-of-experts model ({cfg.architecture}) is not supported yet")
    mode = checkpoint_mode(quantization, ckpt.info, device.type)
    with torch.device("meta"):
        model = model_class(cfg.architecture)(cfg).to(dtype)
    model = model.to_empty(device=device)   # storage a quantized module replaces is never touched
    model.rotary.init_frequencies(device)
    packed_kernels = mode == "gguf" and device.type == "cpu" and native.available()
    model.load_weights(ckpt.iter_weights(weight_chooser(mode, cfg.tie_word_embeddings, packed_kernels)))
    model.requires_grad_(False)
    return model.eval(), mode


# --- frozen products -------------------------------------------------------------------------------

def _module_device(module: nn.Module) -> torch.device:
    return next(itertools.chain(module.parameters(), module.buffers())).device


def _apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module's product x @ W^T (+ bias) for a projection or a tied head, in x's dtype."""
    if isinstance(module, nn.Linear):
        return F.linear(x, module.weight, module.bias)
    if isinstance(module, nn.Embedding):  # a tied LM head
        return F.linear(x, module.weight)
    if isinstance(module, QuantizedLinear):
        return module(x)
    if isinstance(module, QuantizedEmbedding):
        flat = quantized_matmul(x.reshape(-1, x.shape[-1]), module.quantized_weight)
        return flat.view(*x.shape[:-1], -1)
    raise TypeError(f"cannot multiply by a {type(module).__name__}")


def _row_chunk(weight: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    if isinstance(weight, PackedGGUFWeight):
        return PackedGGUFWeight(weight.packed[start:stop], weight.qtype, weight.cols)
    return weight.rows(start, stop)


def input_gradient(module: nn.Linear | nn.Embedding | QuantizedLinear | QuantizedEmbedding,
                   grad: torch.Tensor) -> torch.Tensor:
    """grad_y [..., out] -> grad_x [..., in] = grad_y @ W, W dequantized in row chunks of bounded size
    (a vocabulary-sized head, too, never exists whole in float)."""
    flat = grad.reshape(-1, grad.shape[-1])
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return (flat @ module.weight.to(flat.dtype)).view(*grad.shape[:-1], -1)
    weight = module.quantized_weight
    n, k = weight.shape
    step = max(INT4_ROW_BLOCK, DEQUANT_CHUNK_VALUES // k // INT4_ROW_BLOCK * INT4_ROW_BLOCK)  # int4: whole blocks
    out = torch.zeros(flat.shape[0], k, dtype=flat.dtype, device=flat.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        w = _row_chunk(weight, start, stop).dequantize(flat.dtype).to(flat.device)
        out.addmm_(flat[:, start:stop], w)
    return out.view(*grad.shape[:-1], k)


class _FrozenProduct(torch.autograd.Function):
    """y = module(x) for a frozen module of any format; the gradient flows to x only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module = module
        return _apply(module, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return input_gradient(ctx.module, grad), None


def frozen_product(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _FrozenProduct.apply(x, module)


# --- LoRA ------------------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """base(x) + scale * B(A(dropout(x))), as PEFT computes it. A and B are float32 whatever the model's
    dtype (the optimizer's updates are far below bf16's resolution); A starts kaiming-uniform as in
    PEFT, B at zero, so training starts from the base model exactly."""

    def __init__(self, base: nn.Linear | QuantizedLinear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        device = _module_device(base)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank, self.alpha, self.scale = rank, alpha, lora_scale(alpha, rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = frozen_product(self.base, x)
        update = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (update * self.scale).to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def attach_lora(model: CausalLM, targets: tuple[str, ...] = TARGET_MODULES, rank: int = 8, alpha: float = 16.0,
                dropout: float = 0.0) -> dict[tuple[int, str], LoRALinear]:
    """Wrap each target projection of every layer; returns them by (layer, module name)."""
    wrapped = {}
    for index, layer in enumerate(model.model.layers):
        for name in targets:
            parent = getattr(layer, PROJECTION_PARENT[name])
            module = LoRALinear(getattr(parent, name), rank, alpha, dropout)
            setattr(parent, name, module)
            wrapped[(index, name)] = module
    return wrapped


def lora_parameters(loras: dict[tuple[int, str], LoRALinear]) -> dict[str, nn.Parameter]:
    """The trainable tensors by their PEFT-style names (stable keys for checkpoints)."""
    out = {}
    for (layer, name), module in sorted(loras.items()):
        prefix = f"model.layers.{layer}.{PROJECTION_PARENT[name]}.{name}"
        out[f"{prefix}.lora_A"] = module.lora_A
        out[f"{prefix}.lora_B"] = module.lora_B
    return out


def to_adapter(loras: dict[tuple[int, str], LoRALinear], base_model: str | None, dropout: float = 0.0) -> LoRAAdapter:
    """The trained weights as a LoRAAdapter (float32 on the CPU), ready for save_peft."""
    first = next(iter(loras.values()))
    weights = {key: LoRAWeights(m.lora_A.detach().float().cpu().clone(), m.lora_B.detach().float().cpu().clone(),
                                m.scale) for key, m in loras.items()}
    return LoRAAdapter(weights, first.rank, first.alpha, base_model, extra_config={"lora_dropout": dropout})


# --- the training forward -------------------------------------------------------------------------

def _rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm's reference math (layers/rmsnorm.py without the kernel): in float32, then scaled."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * h.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, split-halves layout (layers/rotary.py without the kernel)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x) if isinstance(module, LoRALinear) else frozen_product(module, x)


def _decoder_layer(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
    attn, mlp = layer.self_attn, layer.mlp
    b, s, _ = x.shape
    h = _rms_norm(layer.input_layernorm, x)
    q = _project(attn.q_proj, h).view(b, s, attn.num_heads, attn.head_dim)
    k = _project(attn.k_proj, h).view(b, s, attn.num_kv_heads, attn.head_dim)
    v = _project(attn.v_proj, h).view(b, s, attn.num_kv_heads, attn.head_dim)
    if attn.qk_norm:  # Qwen3
        q, k = _rms_norm(attn.q_norm, q), _rms_norm(attn.k_norm, k)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=mask is None, scale=attn.scale, enable_gqa=True)
    x = x + _project(attn.o_proj, out.transpose(1, 2).reshape(b, s, -1))
    h = _rms_norm(layer.post_attention_layernorm, x)
    return x + _project(mlp.down_proj, F.silu(_project(mlp.gate_proj, h)) * _project(mlp.up_proj, h))


def hidden_states(model: CausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  gradient_checkpointing: bool = False) -> torch.Tensor:
    """Final hidden states [batch, seq, hidden] of right-padded sequences (attention_mask 1 = token)."""
    b, s = input_ids.shape
    x = model.model.embed_tokens(input_ids).to(input_ids.device)
    positions = torch.arange(s, device=input_ids.device)
    cos, sin = model.rotary.cos_sin(positions, x.dtype)  # [seq, 1, head_dim]: broadcasts over batch and heads
    mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        causal = torch.ones(s, s, dtype=torch.bool, device=input_ids.device).tril()
        # Right padding: every row still sees its first token, so no row is fully masked.
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
    layer: Any   # nn.ModuleList yields nn.Module: a DecoderLayer here
    for layer in model.model.layers:
        if gradient_checkpointing and torch.is_grad_enabled():
            # Keeps only each layer's input; the rest is recomputed (same dropout: the RNG state is replayed).
            x = checkpoint(_decoder_layer, layer, x, cos, sin, mask, use_reentrant=False)
        else:
            x = _decoder_layer(layer, x, cos, sin, mask)
    return _rms_norm(model.model.norm, x)


def lm_head(model: CausalLM) -> nn.Module:
    return model.model.embed_tokens if model.config.tie_word_embeddings else model.lm_head


def logits(model: CausalLM, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits of hidden states (all of them: for tests and small inputs)."""
    return frozen_product(lm_head(model), hidden).float()


def _chunk_loss(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(frozen_product(head, rows).float(), targets, reduction="sum")


def lm_loss(model: CausalLM, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy, labelled tokens): position t predicts labels[t + 1]. Logits are made only
    for labelled positions, a bounded chunk at a time, and recomputed in backward instead of kept."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    rows, wanted = hidden[:, :-1][keep], targets[keep]
    head = lm_head(model)
    chunk = max(1, LOSS_CHUNK_VALUES // model.config.vocab_size)
    total = hidden.new_zeros((), dtype=torch.float32)
    for part, part_targets in zip(rows.split(chunk), wanted.split(chunk)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, part, part_targets, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, part, part_targets)
    return total, int(wanted.numel())
