"""LoRA: adapters in PEFT's and llama.cpp's formats (adapter.py), serving many at once over one
copy of the base weights (layers/lora.py, engine/lora_manager.py), and fine-tuning (finetune.py)."""

from .adapter import LoRAAdapter, LoRAError, LoRARequest, load_adapter

__all__ = ["LoRAAdapter", "LoRAError", "LoRARequest", "load_adapter"]
