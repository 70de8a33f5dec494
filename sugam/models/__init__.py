"""Model implementations. One transformer (qwen2.py) covers Qwen2/2.5/QwQ/R1-Distill, Qwen3 and Llama."""

from .qwen2 import CausalLM

__all__ = ["CausalLM"]
