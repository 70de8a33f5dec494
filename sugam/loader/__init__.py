"""Model loaders: GGUF files and HF folders, both yielding a config, a tokenizer and named tensors."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelNotFoundError
from .base import LoadedCheckpoint


def open_checkpoint(path: Path) -> LoadedCheckpoint:
    """Open a `.gguf` file or an HF folder (config.json + safetensors)."""
    if path.is_file():
        from .gguf import open_gguf
        return open_gguf(path)
    if (path / "config.json").is_file():
        from .hf import open_hf_folder
        return open_hf_folder(path)
    raise ModelNotFoundError(f"{path}: neither a .gguf file nor a folder with config.json")


__all__ = ["LoadedCheckpoint", "open_checkpoint"]
