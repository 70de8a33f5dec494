"""Model implementations, found by architecture through the registry (registry.py). One transformer
(qwen2.py) covers Qwen2/2.5/QwQ/R1-Distill, Qwen3 and Llama; moe.py gives it expert layers for
Qwen3-MoE and Qwen2-MoE."""

from .moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from .qwen2 import CausalLM, LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from .registry import model_class, register_model, supported_architectures

__all__ = ["CausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3ForCausalLM",
           "Qwen3MoeForCausalLM", "model_class", "register_model", "supported_architectures"]
