"""`sugam quantize`: write an HF checkpoint's weights quantized, as a folder that loads without requantizing.

The folder keeps the source's config, tokenizer and template files and holds one
`model.safetensors` whose quantized matrices are stored as their parts ("X.weight.q" +
"X.weight.scale" for int8, "X.weight.codes" + "X.weight.scales_zeros" for int4), marked in the
file's metadata. int4 codes are stored two a byte in column order (not in PyTorch's kernel layout,
which differs from one CPU to another) and packed for this CPU's kernel at load, so a folder made on
one machine loads on any other. The folder is for sugam (transformers cannot read it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import ModelFormatError, SugamError
from ..loader.base import LoadedCheckpoint
from .formats import (
    INT4_GROUP,
    Int4Weight,
    Int8Weight,
    int4_supported,
    pack_codes,
    pack_int4,
    quantize_int8,
    unpack_codes,
)
from .policy import weight_chooser

METADATA_KEY = "sugam_quantization"
INT4_LAYOUT = "column-pairs"   # codes of columns 2j (low nibble) and 2j + 1 (high) in byte j
PARTS = {"int8": ("q", "scale"), "int4": ("codes", "scales_zeros")}


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
        if isinstance(weight, Int4Weight):
            tensors[f"{name}.codes"] = pack_codes(weight.codes())
            tensors[f"{name}.scales_zeros"] = weight.scales_zeros.contiguous()
        elif isinstance(weight, Int8Weight):
            for part, tensor in weight.tensors().items():
                tensors[f"{name}.{part}"] = tensor.contiguous()
        elif isinstance(weight, torch.Tensor):
            tensors[name] = weight.contiguous()
        else:  # the int8/int4 chooser keeps no GGUF blocks; a loader that did would need its own format here
            raise SugamError(f"{name}: cannot write a {type(weight).__name__} to safetensors")
    target = out_dir / "model.safetensors"
    save_file(tensors, str(target), metadata={"format": "pt", METADATA_KEY: mode, "int4_layout": INT4_LAYOUT,
                                               "int4_group": str(INT4_GROUP), "torch": torch.__version__})
    return target.stat().st_size


def check_layout(metadata: dict[str, str], file: object) -> None:
    if metadata.get("int4_layout", INT4_LAYOUT) != INT4_LAYOUT:
        raise ModelFormatError(f"{file}: int4 weights in the CPU-specific layout of an older sugam "
                               f"({metadata['int4_layout']}); run `sugam quantize` on the source model again")


def assemble(parts: dict[str, torch.Tensor], group: int) -> Int8Weight | Int4Weight | None:
    """The quantized weight once all its stored parts are read, else None. int4 codes are packed for
    this CPU's kernel here (or become int8 where PyTorch's int4 packing is unknown)."""
    if set(parts) == set(PARTS["int8"]):
        # A copy: PyTorch's int8 kernel reads the codes with aligned vector loads (a segfault otherwise),
        # and a tensor read from a safetensors file starts wherever the file's header put it.
        return Int8Weight(parts["q"].clone(), parts["scale"].clone())
    if set(parts) == set(PARTS["int4"]):
        codes, sz = unpack_codes(parts["codes"]), parts["scales_zeros"].to(torch.float32)
        scale, zero = sz[..., 0].t(), sz[..., 1].t()
        if int4_supported(tuple(codes.shape), group):
            return pack_int4(codes, scale, zero, group)
        values = (codes.to(torch.float32) - 8) * scale.repeat_interleave(group, 1) + zero.repeat_interleave(group, 1)
        return quantize_int8(values)
    return None
