"""Mixture-of-experts Qwens: Qwen3-MoE (Qwen3-30B-A3B, ...) and Qwen2-MoE / Qwen1.5-MoE.

The layers are Qwen3's and Qwen2's, except that a sparse layer's MLP is a router over experts:
softmax over all experts (in fp32), the top k, optionally renormalised (`norm_topk_prob`), each
token's output the weighted sum of its k experts' SwiGLU MLPs; Qwen2-MoE adds a shared expert
scaled by sigmoid(shared_expert_gate(x)). Which layers are sparse: config.sparse_layer (transformers'
decoder_sparse_step / mlp_only_layers rule). Module names are the HF checkpoints'
(mlp.gate, mlp.experts.N.gate_proj, mlp.shared_expert, mlp.shared_expert_gate), so safetensors
load by name and each expert is its own (quantized) matrix: a GGUF file's 3-D expert tensors are
cut into per-expert slices of their blocks by the loader.

Compute reads only the chosen experts: the tokens of a step are grouped by expert, and each chosen
expert multiplies its rows once (one matmul per projection per step, whatever the batch), then
the results are added back with the routing weights. A decode step of one token reads top-k
experts per layer and nothing of the others.

The native decoder (native_decode.py) computes dense layers only; these classes do not declare it,
so the runner takes the Python layers for every step of an MoE model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .qwen2 import MLP, CausalLM
from .registry import register_model


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = (
            cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)   # the router
        self.experts = nn.ModuleList(MLP(cfg, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def fuse_projections(self) -> None:
        expert: MLP
        for expert in self.experts:  # type: ignore[assignment]  # a ModuleList of MLPs
            expert.fuse_projections()
        if hasattr(self, "shared_expert"):
            self.shared_expert.fuse_projections()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [tokens, k] in x's dtype, expert ids [tokens, k]), as transformers computes them."""
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.route(x)
        # Sort the (token, expert) pairs by expert: each expert's rows are then one slice.
        flat = chosen.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // self.top_k
        scale = weights.flatten()[order].unsqueeze(1)
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):  # ascending, so each token sums its experts in transformers' order
            if n:
                rows = tokens[start:start + n]
                out.index_add_(0, rows, self.experts[e](x[rows]) * scale[start:start + n])
                start += n
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class MoECausalLM(CausalLM):
    """A Qwen2/Qwen3 transformer whose sparse layers get a SparseMoeBlock for an MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        for index, layer in enumerate(self.model.layers):
            if cfg.sparse_layer(index):
                layer.mlp = SparseMoeBlock(cfg)


@register_model("qwen3_moe")
class Qwen3MoeForCausalLM(MoECausalLM):
    """Qwen3-MoE: Qwen3 attention (q/k RMSNorm), routed experts, top-k weights renormalised per config."""


@register_model("qwen2_moe")
class Qwen2MoeForCausalLM(MoECausalLM):
    """Qwen2-MoE / Qwen1.5-MoE: Qwen2 attention (QKV bias), routed experts plus a gated shared expert."""
