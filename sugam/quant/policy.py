"""Which weights to keep quantized, and in which format.

Modes (the `--quantization` flag):
- "none":  every weight dense in the model dtype (the exact fp32 reference path).
- "gguf":  keep a GGUF file's own precision. Where sugam's own CPU kernels run (sugam/native), the
           file's blocks are kept as they are, rearranged ("packed"); elsewhere 4-bit types
           (Q4_0/Q4_1/Q4_K) -> int4 with the same codes, other quantized types (Q5_x, Q6_K, Q8_0)
           -> int8. Float tensors stay dense.
- "int8":  every matrix int8 (per-row scales).
- "int4":  every matrix int4 (groups of 32) where its shape allows, else int8.
An untied token embedding from a GGUF file stays in its GGUF blocks ("rows": exact, as small as the
file, looked up row by row). Any other quantized embedding is int8, so that a tied LM head can
multiply by it.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import SugamError
from .formats import int4_supported
from .gguf_pack import packable

MODES = ("auto", "none", "gguf", "int8", "int4")
FOUR_BIT_SOURCES = {"Q4_0", "Q4_1", "Q4_K"}
DENSE_SOURCES = {"F32", "F16", "BF16", "float32", "float16", "bfloat16"}
_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# (parameter name, shape, source type e.g. "Q4_K" or "bfloat16") -> "packed" | "int8" | "int4" | "rows" | None (dense)
WeightChooser = Callable[[str, tuple[int, ...], str], "str | None"]


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    if len(shape) != 2 or not name.endswith(".weight"):
        return False
    module = name.rsplit(".", 2)[-2]
    return module in _MATRICES or name in ("lm_head.weight", "model.embed_tokens.weight")


def weight_chooser(mode: str, tied_embeddings: bool = False, packed_kernels: bool = False) -> WeightChooser | None:
    """packed_kernels: sugam's CPU kernels run here (sugam.native.available()), so "gguf" keeps the
    file's blocks for the matrices they read."""
    if mode == "none":
        return None

    def choose(name: str, shape: tuple[int, ...], source: str) -> str | None:
        if not is_quantizable(name, shape):
            return None
        if mode == "gguf" and source in DENSE_SOURCES:
            return None
        if name == "model.embed_tokens.weight":
            # A GGUF-quantized embedding that is only looked up stays in its blocks.
            return "rows" if source not in DENSE_SOURCES and not tied_embeddings else "int8"
        if mode == "gguf" and packed_kernels and packable(source, shape[1]):
            return "packed"
        if mode == "int4" or (mode == "gguf" and source in FOUR_BIT_SOURCES):
            return "int4" if int4_supported(shape) else "int8"
        return "int8"

    return choose


def checkpoint_mode(mode: str, info: dict, device_type: str) -> str:
    """The mode a checkpoint loads in: a `sugam quantize` folder's own, whatever was asked, else
    resolve_mode's."""
    resolved = resolve_mode(mode, info.get("format", ""), device_type)
    return info.get("sugam_quantization") or resolved


def resolve_mode(mode: str, checkpoint_format: str, device_type: str) -> str:
    """"auto" keeps a GGUF file quantized where the fast kernels exist (the CPU) and loads everything
    else dense. (An explicit `--dtype float32` asks for "none", the exact reference: sugam.llm.load_engine.)"""
    if mode not in MODES:
        raise SugamError(f"unknown quantization {mode!r}; use one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    return "gguf" if checkpoint_format == "gguf" and device_type == "cpu" else "none"
