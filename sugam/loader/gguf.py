"""GGUF files: a strict header parser, name mapping to HF names, and dequantization.

We parse the header ourselves (the format is small) for two reasons: every count, length and
offset read from the file is checked against the file size before it is trusted, and parsing a
150k-token vocabulary takes a fraction of a second instead of the several seconds
`gguf.GGUFReader` needs. The `gguf` package supplies the type tables and the reference
dequantization kernels.

Weights stay as raw quantized rows (`GGUFTensor`) until the model asks for them, so the quantized
path (`sugam/quant/gguf_repack.py`) repacks blocks instead of dequantizing whole tensors.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..quant.formats import GGUFRows, QuantizedWeight
from ..quant.gguf_repack import dequantize_rows, pack_for_kernels, repack
from ..quant.policy import WeightChooser
from .base import GenerationDefaults, LoadedCheckpoint, TokenizerSpec

SUPPORTED_TYPES = {
    GGMLQuantizationType[name]
    for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
}

# GGUF metadata value types -> (struct format, numpy dtype) for fixed-size scalars.
_SCALARS = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4
_MAX_STRING = 1 << 28  # 256 MiB: far above any real chat template or token


@dataclass
class GGUFTensor:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]   # torch order: (rows, cols) for matrices
    raw: np.ndarray          # uint8 [rows, bytes_per_row] (quantized) or typed [rows, cols]; a view of the mmap
    file_range: tuple[int, int] = (0, 0)  # byte offsets of the data in the file

    def dequantize(self) -> torch.Tensor:
        """Float32 values, exactly as the GGUF reference kernels compute them."""
        return torch.from_numpy(np.ascontiguousarray(dequantize_rows(self.raw, self.qtype)).reshape(self.shape))


class _Cursor:
    """Reads little-endian values from a buffer, refusing to step past its end."""

    def __init__(self, buf: memoryview | bytes, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ModelFormatError(
                f"{self.path}: truncated or corrupted GGUF (needs {n} bytes at offset {self.pos}, "
                f"file has {len(self.buf)})")
        view = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > _MAX_STRING:
            raise ModelFormatError(f"{self.path}: string of {n} bytes at offset {self.pos} is not plausible")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelFormatError(f"{self.path}: invalid UTF-8 in a string at offset {self.pos}") from exc

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type in _SCALARS:
                dtype = np.dtype(_SCALARS[item_type][1]).newbyteorder("<")
                data = self.take(count * dtype.itemsize)  # take() bounds-checks count
                return np.frombuffer(data, dtype=dtype).tolist()
            if count > len(self.buf) - self.pos:  # every item needs at least one byte
                raise ModelFormatError(f"{self.path}: array of {count} items overruns the file")
            return [self.value(item_type) for _ in range(count)]
        raise ModelFormatError(f"{self.path}: unknown metadata value type {vtype} at offset {self.pos}")


class GGUFFile:
    """A parsed GGUF file: metadata dict and tensors (memory-mapped, not yet decoded)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"{self.path}: cannot read file ({exc})") from exc
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        self._parse()

    def _parse(self) -> None:
        cur = _Cursor(self._mmap, self.path)
        if bytes(cur.take(4)) != b"GGUF":
            raise ModelFormatError(f"{self.path}: not a GGUF file (bad magic)")
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise ModelFormatError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        file_size = len(self._mmap)
        if n_tensors > file_size // 16 or n_kv > file_size // 16:
            raise ModelFormatError(f"{self.path}: header claims {n_tensors} tensors and {n_kv} keys, "
                                   f"too many for a {file_size}-byte file")
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))

        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise ModelFormatError(f"{self.path}: tensor {name!r} has {n_dims} dimensions")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
            infos.append((name, dims, type_id, offset))

        alignment = int(self.metadata.get("general.alignment", 32))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ModelFormatError(f"{self.path}: general.alignment {alignment} is not a power of two")
        data_start = -(-cur.pos // alignment) * alignment
        buf = np.frombuffer(self._mmap, dtype=np.uint8)
        for name, dims, type_id, offset in infos:
            self.tensors[name] = self._tensor(buf, name, dims, type_id, data_start + offset, file_size)

    def _tensor(self, buf: np.ndarray, name: str, dims: list[int], type_id: int, start: int,
                file_size: int) -> GGUFTensor:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise ModelFormatError(f"{self.path}: tensor {name!r} has unknown type id {type_id}") from None
        if qtype not in SUPPORTED_TYPES:
            raise ModelFormatError(
                f"{self.path}: tensor {name!r} has type {qtype.name}, which sugam does not support "
                f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if any(d <= 0 for d in dims) or dims[0] % block:
            raise ModelFormatError(f"{self.path}: tensor {name!r} has shape {dims}, invalid for {qtype.name}")
        n_elements = int(np.prod(dims, dtype=np.float64))
        n_bytes = n_elements // block * block_bytes
        if start + n_bytes > file_size:
            raise ModelFormatError(
                f"{self.path}: tensor {name!r} needs bytes {start}..{start + n_bytes} but the file has "
                f"only {file_size}; the file is truncated or corrupted")
        shape = tuple(reversed(dims))  # GGUF lists the fastest-varying dimension first
        rows = n_elements // dims[0]
        raw = buf[start:start + n_bytes]
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            raw = raw.view(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16)
        raw = raw.reshape(rows, -1)
        return GGUFTensor(name, qtype, shape, raw, (start, start + n_bytes))

    def drop_pages(self, tensor: GGUFTensor) -> None:
        """Tell the kernel this process is done with a tensor's bytes.

        Mapped file pages count in RSS once read; dropping them after each tensor is converted keeps
        peak load memory near the converted model instead of the model plus the whole file.
        """
        page = mmap.PAGESIZE
        start = -(-tensor.file_range[0] // page) * page
        end = tensor.file_range[1] // page * page
        if end > start and hasattr(self._mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)


# GGUF tensor names -> HF parameter names (module names in sugam's model match HF's).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for tensors we don't use."""
    match = _LAYER_RE.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        mapped = _LAYER_NAMES.get(part)
        return f"model.layers.{layer}.{mapped}.{kind}" if mapped else None
    base, _, kind = gguf_name.rpartition(".")
    mapped = _GLOBAL_NAMES.get(base)
    return f"{mapped}.{kind}" if mapped else None


def unpermute_rows(raw: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (it interleaves the two rotary halves of each head).

    It works on whole rows, so it applies to quantized rows as well as to float ones.
    """
    rows = raw.shape[0]
    head_rows = rows // n_heads
    return (raw.reshape(n_heads, head_rows // 2, 2, *raw.shape[1:])
               .swapaxes(1, 2).reshape(raw.shape))


def open_gguf(path: Path, gguf: GGUFFile | None = None) -> LoadedCheckpoint:
    """`gguf`: the file already parsed, when the caller needs its tensor table too."""
    gguf = gguf or GGUFFile(path)
    meta, tensors = gguf.metadata, gguf.tensors
    if "token_embd.weight" not in tensors:
        raise ModelFormatError(f"{path}: no token_embd.weight tensor; not a language model GGUF")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab_size = tensors["token_embd.weight"].shape[0]
    config = ModelConfig.from_gguf_metadata(meta, vocab_size=vocab_size, tensor_names=set(tensors))
    _check_shapes(path, config, tensors)
    if meta.get("tokenizer.ggml.model") != "gpt2" or not tokens:
        raise ModelFormatError(
            f"{path}: tokenizer model {meta.get('tokenizer.ggml.model')!r} is not supported "
            f"(sugam builds byte-level BPE tokenizers, tokenizer.ggml.model = 'gpt2')")
    spec = TokenizerSpec(
        tokens=tokens,
        token_types=meta.get("tokenizer.ggml.token_type"),
        merges=meta.get("tokenizer.ggml.merges"),
        pre_tokenizer=meta.get("tokenizer.ggml.pre"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
    )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(spec, key)
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ModelFormatError(f"{path}: tokenizer {key} {token_id} is outside the vocabulary")
    eos = [spec.eos_token_id] if spec.eos_token_id is not None else []
    # Chat models end a turn with <|im_end|> but may also emit <|endoftext|>: stop on both.
    control = {tok: i for i, (tok, kind) in enumerate(zip(tokens, spec.token_types or [])) if kind == 3}
    eos += [control[t] for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>") if t in control and control[t] not in eos]
    config.eos_token_ids = eos

    def iter_weights(choose: WeightChooser | None = None) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
        for name, tensor in tensors.items():
            target = hf_name(name)
            if target is None:
                continue
            if config.architecture == "llama" and (".attn_q." in name or ".attn_k." in name):
                heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
                rows = unpermute_rows(tensor.raw.reshape(tensor.shape[0], -1), heads)  # biases too
                tensor = GGUFTensor(tensor.name, tensor.qtype, tensor.shape, rows.reshape(tensor.raw.shape))
            fmt = choose(target, tensor.shape, tensor.qtype.name) if choose else None
            if fmt is None:
                yield target, tensor.dequantize()
            elif fmt == "rows":  # kept as the file's blocks (a copy: the mapping is released)
                yield target, GGUFRows(torch.from_numpy(np.array(tensor.raw)), tensor.qtype.name, tensor.shape[1])
            elif fmt == "packed":  # the file's blocks, rearranged for sugam's CPU kernels
                yield target, pack_for_kernels(tensor.raw.reshape(tensor.shape[0], -1), tensor.qtype, tensor.shape)
            else:  # repacked block by block: no float copy of the whole matrix
                yield target, repack(tensor.raw.reshape(tensor.shape[0], -1), tensor.qtype, tensor.shape, fmt)
            gguf.drop_pages(tensors[name])  # every path made its own copy

    types: dict[str, int] = {}
    for t in tensors.values():
        types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
    return LoadedCheckpoint(path=path, config=config, tokenizer=spec,
                            generation=GenerationDefaults(eos_token_ids=eos),
                            iter_weights=iter_weights, info={"format": "gguf", "tensor_types": types,
                                                             "name": meta.get("general.name")})


def _check_shapes(path: Path, config: ModelConfig, tensors: dict[str, GGUFTensor]) -> None:
    """The metadata and the tensors must agree before anything is allocated from them."""
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    expected = {
        "token_embd.weight": (config.vocab_size, h),
        "blk.0.attn_q.weight": (config.num_attention_heads * config.head_dim, h),
        "blk.0.attn_k.weight": (kv, h),
        "blk.0.attn_v.weight": (kv, h),
        "blk.0.ffn_up.weight": (config.intermediate_size, h),
    }
    for name, shape in expected.items():
        got = tensors.get(name)
        if got is None:
            raise ModelFormatError(f"{path}: tensor {name} is missing")
        if tuple(got.shape) != shape:
            raise ModelFormatError(f"{path}: tensor {name} has shape {got.shape}, metadata implies {shape}")
    last = f"blk.{config.num_hidden_layers - 1}.attn_q.weight"
    if last not in tensors:
        raise ModelFormatError(f"{path}: metadata says {config.num_hidden_layers} layers but {last} is missing")
