"""`sugam quantize`: write an HF checkpoint's weights quantized, as a folder that loads without requantizing.

The folder keeps the source's config, tokenizer and template files and holds one
`model.safetensors` whose quantized matrices are stored as their parts ("X.weight.q" +
"X.weight.scale" for int8, "X.weight.packed" + "X.weight.scales_zeros" for int4), marked in the
file's metadata. The int4 bytes are in the layout of PyTorch's CPU int4 kernel, so the folder is
for sugam (transformers cannot read it); loading it skips all quantization work.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import SugamError
from ..loader.base import LoadedCheckpoint
from .formats import INT4_GROUP, Int4Weight, Int8Weight
from .policy import weight_chooser

METADATA_KEY = "sugam_quantization"
INT4_LAYOUT = "torch-cpu-int4pack"
PARTS = {"int8": ("q", "scale"), "int4": ("packed", "scales_zeros")}


def save_quantized(checkpoint: LoadedCheckpoint, out_dir: Path, mode: str) -> int:
    """Quantize `checkpoint` (an HF folder) with `mode` ("int8" or "int4") into `out_dir`; returns bytes written."""
    from safetensors.torch import save_file

    if checkpoint.info.get("format") != "safetensors":
        raise SugamError("sugam quantize reads HF folders (safetensors); GGUF files are already quantized")
    if checkpoint.info.get(METADATA_KEY):
        raise SugamError(f"{checkpoint.path} is already quantized ({checkpoint.info[METADATA_KEY]})")
    if mode not in PARTS:
        raise SugamError(f"--quantization must be int8 or int4 for sugam quantize, not {mode!r}")
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(checkpoint.path).resolve():
        raise SugamError("write the quantized model to a new folder, not over its source")
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in Path(checkpoint.path).iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pt")):
            shutil.copy2(item, out_dir / item.name)

    tensors: dict[str, torch.Tensor] = {}
    choose = weight_chooser(mode, checkpoint.config.tie_word_embeddings)
    for name, weight in checkpoint.iter_weights(choose):
        if isinstance(weight, (Int8Weight, Int4Weight)):
            for part, tensor in weight.tensors().items():
                tensors[f"{name}.{part}"] = tensor.contiguous()
        else:
            tensors[name] = weight.contiguous()
    target = out_dir / "model.safetensors"
    save_file(tensors, str(target), metadata={"format": "pt", METADATA_KEY: mode, "int4_layout": INT4_LAYOUT,
                                               "int4_group": str(INT4_GROUP), "torch": torch.__version__})
    return target.stat().st_size


def assemble(parts: dict[str, torch.Tensor], group: int) -> Int8Weight | Int4Weight | None:
    """The quantized weight once all its stored parts are read, else None."""
    if set(parts) == set(PARTS["int8"]):
        return Int8Weight(parts["q"], parts["scale"])
    if set(parts) == set(PARTS["int4"]):
        return Int4Weight(parts["packed"], parts["scales_zeros"], group)
    return None
