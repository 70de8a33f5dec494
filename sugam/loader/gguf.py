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

import math
import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..quant.formats import GGUFRows
from ..quant.gguf_repack import dequantize_rows, pack_for_kernels, repack
from ..quant.policy import WeightChooser
from .base import GenerationDefaults, LoadedCheckpoint, TokenizerSpec

if TYPE_CHECKING:
    from ..distributed.sharding import ShardPlan
    from .base import LoadedWeight

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
_INTS, _FLOATS, _BOOL = frozenset({0, 1, 2, 3, 4, 5, 10, 11}), frozenset({6, 12}), 7
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
               7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}
_U64 = struct.Struct("<Q")

_MAX_DIMS = 4
_MAX_STRING = 1 << 28     # 256 MiB: far above any real chat template or token
_MAX_KEY = 1 << 16        # metadata keys are dotted names of a few dozen bytes
_MAX_NAME = 63            # llama.cpp's GGML_MAX_NAME (64, with the terminating NUL)
_MAX_NESTING = 3          # arrays of arrays (llama.cpp reads none; gguf-py can write them)
# Strings in all metadata arrays together. The largest vocabularies have ~262k tokens and as many
# merges; 4 M is 8x that, and parsing 4 M strings takes ~2 s. A file of empty strings could
# otherwise ask for one Python object per 8 bytes (12 M strings in a 98 MB file took > 20 s).
_MAX_STRINGS = 1 << 22

# What each metadata key sugam reads must hold ({arch} is general.architecture). A value of
# another type is refused, not coerced: the string 'false' is not False, 3.7 is not a token id.
_KINDS = {
    "general.architecture": "string", "general.name": "string", "general.alignment": "int",
    "general.file_type": "int", "general.quantization_version": "int",
    "{arch}.context_length": "int", "{arch}.embedding_length": "int", "{arch}.block_count": "int",
    "{arch}.feed_forward_length": "int", "{arch}.attention.head_count": "int",
    "{arch}.attention.head_count_kv": "int", "{arch}.attention.key_length": "int",
    "{arch}.attention.value_length": "int", "{arch}.attention.layer_norm_rms_epsilon": "float",
    "{arch}.rope.freq_base": "float", "{arch}.rope.dimension_count": "int", "{arch}.rope.scaling.type": "string",
    "{arch}.rope.scaling.factor": "float", "{arch}.rope.scaling.original_context_length": "int",
    "{arch}.vocab_size": "int", "{arch}.expert_count": "int", "{arch}.expert_used_count": "int",
    "{arch}.expert_feed_forward_length": "int", "{arch}.expert_shared_feed_forward_length": "int",
    "{arch}.expert_weights_norm": "bool",
    "tokenizer.ggml.model": "string", "tokenizer.ggml.pre": "string", "tokenizer.ggml.tokens": "string[]",
    "tokenizer.ggml.token_type": "int[]", "tokenizer.ggml.scores": "float[]", "tokenizer.ggml.merges": "string[]",
    "tokenizer.ggml.bos_token_id": "int", "tokenizer.ggml.eos_token_id": "int",
    "tokenizer.ggml.padding_token_id": "int", "tokenizer.ggml.unknown_token_id": "int",
    "tokenizer.ggml.add_bos_token": "bool", "tokenizer.ggml.add_eos_token": "bool",
    "tokenizer.chat_template": "string",
}


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
    """Reads little-endian values from a buffer, refusing to step past its end. Every count and
    length is checked against the bytes left before anything is allocated for it."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf, self.pos, self.path = buf, 0, path
        self.view = memoryview(buf)
        self.strings = 0  # strings read from arrays so far (capped by _MAX_STRINGS)

    def fail(self, message: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: {message}")

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.left():
            raise self.fail(f"truncated or corrupted GGUF: {what} needs {n} bytes at offset {self.pos}, "
                            f"the file has {len(self.buf)}")
        view = self.view[self.pos:self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int = _MAX_STRING) -> str:
        n = self.scalar("<Q", what)
        if n > limit:
            raise self.fail(f"{what} claims {n} bytes at offset {self.pos}, which is not plausible")
        data = self.take(n, what)
        try:
            return str(data, "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8 (offset {self.pos - n})") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype == _BOOL:
            byte = self.scalar("<B", what)
            if byte > 1:
                raise self.fail(f"{what} is a boolean stored as {byte} (0 or 1)")
            return bool(byte)
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype][0], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what, depth + 1)
        raise self.fail(f"{what} has unknown value type {vtype} (offset {self.pos})")

    def array(self, what: str, depth: int) -> Any:
        if depth > _MAX_NESTING:
            raise self.fail(f"{what} nests arrays more than {_MAX_NESTING} deep")
        item_type, count = self.scalar("<I", what), self.scalar("<Q", what)
        if item_type in _SCALARS:
            # One numpy view of the file, not one Python object per item (8+ bytes per file byte).
            dtype = np.dtype(_SCALARS[item_type][1]).newbyteorder("<")
            if count > self.left() // dtype.itemsize:
                raise self.fail(f"{what}: array of {count} {_TYPE_NAMES[item_type]} overruns the file")
            return np.frombuffer(self.take(count * dtype.itemsize, what), dtype=dtype)
        if item_type == _STRING:
            return self.string_array(count, what)
        if item_type == _ARRAY:
            if count > self.left() // 12:  # each inner array has a 4-byte type and an 8-byte count
                raise self.fail(f"{what}: array of {count} arrays overruns the file")
            return [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]
        raise self.fail(f"{what} is an array of unknown value type {item_type}")

    def string_array(self, count: int, what: str) -> list[str]:
        if count > self.left() // 8:  # each string has at least its 8-byte length
            raise self.fail(f"{what}: array of {count} strings overruns the file")
        self.strings += count
        if self.strings > _MAX_STRINGS:
            raise self.fail(f"{what}: {self.strings} strings in metadata arrays (at most {_MAX_STRINGS} are read)")
        # The hot loop of parsing a vocabulary: locals only, one decode per string.
        buf, pos, end, unpack = self.buf, self.pos, len(self.buf), _U64.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(count):
            if pos + 8 > end:
                raise self.fail(f"truncated or corrupted GGUF: {what}[{i}] at offset {pos} runs past the end")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > end - pos:
                raise self.fail(f"truncated or corrupted GGUF: {what}[{i}] claims {n} bytes at offset {pos}")
            try:
                append(str(buf[pos:pos + n], "utf-8"))
            except UnicodeDecodeError:
                raise self.fail(f"{what}[{i}] is not valid UTF-8 (offset {pos})") from None
            pos += n
        self.pos = pos
        return out


class GGUFFile:
    """A parsed GGUF file: metadata dict and tensors (memory-mapped, not yet decoded).

    The checks are llama.cpp's: no key or tensor name twice; the tensor table lists the data in
    file order, each tensor starting where the previous one ends (rounded up to the alignment), so
    no two overlap and none leaves a gap; every tensor's size is its type size times its shape and
    lies inside the file; the metadata values sugam reads have the types their keys require.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"{self.path}: cannot read file ({exc})") from exc
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, int | tuple[int, int]] = {}  # GGUF type (array: (9, item type))
        self.tensors: dict[str, GGUFTensor] = {}
        self.alignment = 32
        self._parse()

    def _fail(self, message: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: {message}")

    def _parse(self) -> None:
        cur = _Cursor(self._mmap, self.path)
        if bytes(cur.take(4, "the magic number")) != b"GGUF":
            raise self._fail("not a GGUF file (bad magic)")
        version = cur.scalar("<I", "the version")
        if version not in (2, 3):
            raise self._fail(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.scalar("<Q", "the tensor count"), cur.scalar("<Q", "the key count")
        file_size = len(self._mmap)
        if n_tensors > file_size // 16 or n_kv > file_size // 16:
            raise self._fail(f"header claims {n_tensors} tensors and {n_kv} keys, too many for a "
                             f"{file_size}-byte file")
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}", _MAX_KEY)
            if key in self.metadata:
                raise self._fail(f"metadata key {key!r} appears twice")
            vtype = cur.scalar("<I", f"the type of {key}")
            start = cur.pos
            self.metadata[key] = cur.value(vtype, key)
            self.metadata_types[key] = (vtype, struct.unpack_from("<I", self._mmap, start)[0]) if vtype == _ARRAY \
                else vtype
        self._check_metadata_types()

        infos, names = [], set()
        for i in range(n_tensors):
            name = cur.string(f"the name of tensor #{i}", _MAX_NAME)
            if not name or len(name.encode()) > _MAX_NAME:
                raise self._fail(f"tensor #{i} has a name of {len(name.encode())} bytes (1 to {_MAX_NAME})")
            if name in names:
                raise self._fail(f"tensor {name!r} appears twice in the tensor table")
            names.add(name)
            n_dims = cur.scalar("<I", f"the dimension count of {name}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise self._fail(f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS})")
            dims = [cur.scalar("<Q", f"the shape of {name}") for _ in range(n_dims)]
            type_id, offset = cur.scalar("<I", f"the type of {name}"), cur.scalar("<Q", f"the offset of {name}")
            infos.append((name, dims, type_id, offset))

        alignment = self.metadata.get("general.alignment", 32)
        if not 0 < alignment <= 1 << 30 or alignment & (alignment - 1):
            raise self._fail(f"general.alignment {alignment} is not a power of two")
        self.alignment = alignment
        data_start = -(-cur.pos // alignment) * alignment
        if infos and data_start > file_size:
            raise self._fail(f"the tensor data would start at byte {data_start}, past the end of the "
                             f"{file_size}-byte file")
        buf = np.frombuffer(self._mmap, dtype=np.uint8)
        expected, previous = 0, None
        for name, dims, type_id, offset in infos:
            qtype, n_bytes = self._tensor_type_and_size(name, dims, type_id)
            if offset != expected:  # llama.cpp's rule: each tensor follows the previous, aligned
                if offset % alignment:
                    problem = f"is not a multiple of general.alignment ({alignment})"
                elif previous is None:
                    problem = "is not where the data section starts"
                elif offset < expected:
                    problem = f"overlaps the data of {previous!r}"
                else:
                    problem = f"leaves a gap of {offset - expected} bytes after {previous!r}"
                raise self._fail(f"tensor {name!r} has data offset {offset}, expected {expected}: it {problem}")
            start = data_start + offset
            if start + n_bytes > file_size:
                raise self._fail(f"tensor {name!r} needs bytes {start}..{start + n_bytes} but the file has only "
                                 f"{file_size}; the file is truncated or corrupted")
            self.tensors[name] = self._tensor(buf, name, dims, qtype, start, n_bytes)
            expected = -(-(offset + n_bytes) // alignment) * alignment
            previous = name
        trailing = file_size - (data_start + expected)
        if infos and trailing > 0:  # writers end the file with the last tensor's padding, at most
            raise self._fail(f"{trailing} bytes follow the last tensor's data: the tensor table does not "
                             "describe the whole file (a wrong type or shape?)")

    def _check_metadata_types(self) -> None:
        arch = self.metadata.get("general.architecture")
        if "general.architecture" in self.metadata and not isinstance(arch, str):
            raise self._fail(f"general.architecture must be a string, not {self._type_name('general.architecture')}")
        for pattern, kind in _KINDS.items():
            key = pattern.format(arch=arch) if "{arch}" in pattern else pattern
            if "{arch}" in pattern and arch is None or key not in self.metadata:
                continue
            vtype, value = self.metadata_types[key], self.metadata[key]
            if kind == "int":
                ok = vtype in _INTS and value >= 0
            elif kind == "float":
                ok = (vtype in _FLOATS or vtype in _INTS) and math.isfinite(value)
            elif kind == "bool":
                ok = vtype == _BOOL
            elif kind == "string":
                ok = vtype == _STRING
            else:
                items = {"int[]": _INTS, "float[]": _FLOATS, "string[]": {_STRING}}[kind]
                ok = isinstance(vtype, tuple) and vtype[1] in items
                if ok and kind == "float[]":
                    ok = bool(np.isfinite(value).all())
            if not ok:
                expected = {"int": "a non-negative integer", "float": "a finite number", "bool": "a boolean",
                            "string": "a string", "int[]": "an array of integers",
                            "float[]": "an array of finite numbers", "string[]": "an array of strings"}[kind]
                got = self._type_name(key)
                if not isinstance(value, (list, np.ndarray)):
                    got += f" {value!r}"[:60]
                raise self._fail(f"metadata {key} must be {expected}, not {got}")

    def _type_name(self, key: str) -> str:
        vtype = self.metadata_types[key]
        if isinstance(vtype, tuple):
            return f"an array of {_TYPE_NAMES.get(vtype[1], 'unknown')}"
        return _TYPE_NAMES[vtype]

    def _tensor_type_and_size(self, name: str, dims: list[int], type_id: int) -> tuple[GGMLQuantizationType, int]:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise self._fail(f"tensor {name!r} has unknown type id {type_id}") from None
        if qtype not in SUPPORTED_TYPES:
            raise self._fail(
                f"tensor {name!r} has type {qtype.name}, which sugam does not support "
                f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if any(d <= 0 for d in dims) or dims[0] % block or math.prod(dims) >= 1 << 62:
            raise self._fail(f"tensor {name!r} has shape {dims}, invalid for {qtype.name}")
        return qtype, math.prod(dims) // block * block_bytes

    def _tensor(self, buf: np.ndarray, name: str, dims: list[int], qtype: GGMLQuantizationType, start: int,
                n_bytes: int) -> GGUFTensor:
        shape = tuple(reversed(dims))  # GGUF lists the fastest-varying dimension first
        rows = math.prod(dims) // dims[0]
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
    # mixture of experts: the router, the shared expert and its gate ...
    "ffn_gate_inp": "mlp.gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    # ... and the routed experts, one 3-D tensor [experts, rows, cols] each, cut per expert by
    # _expert_slices into mlp.experts.N.gate_proj etc.
    "ffn_gate_exps": "mlp.experts.gate_proj", "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
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


def _expert_slices(target: str, tensor: GGUFTensor) -> Iterator[tuple[str, GGUFTensor]]:
    """`model.layers.L.mlp.experts.up_proj.weight` [experts, rows, cols] -> each expert's matrix,
    `model.layers.L.mlp.experts.N.up_proj.weight` [rows, cols]: a view of the same blocks (an
    expert's rows are contiguous in the file), so quantized experts stay quantized."""
    experts, rows, _ = tensor.shape
    head, _, proj = target.removesuffix(".weight").rpartition(".")
    for e in range(experts):
        yield (f"{head}.{e}.{proj}.weight",
               GGUFTensor(f"{tensor.name}[{e}]", tensor.qtype, tensor.shape[1:], tensor.raw[e * rows:(e + 1) * rows]))


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
    vocab_size = tensors["token_embd.weight"].shape[0]
    try:
        config = ModelConfig.from_gguf_metadata(meta, vocab_size=vocab_size, tensor_names=set(tensors))
    except ModelFormatError as exc:  # name the file: the config alone does not know it
        raise ModelFormatError(f"{path}: {exc}") from None
    _check_shapes(path, config, tensors)
    spec = _tokenizer_spec(path, meta, vocab_size)
    tokens = spec.tokens or []
    eos = [spec.eos_token_id] if spec.eos_token_id is not None else []
    # Chat models end a turn with <|im_end|> but may also emit <|endoftext|>: stop on both.
    control = {tok: i for i, (tok, kind) in enumerate(zip(tokens, spec.token_types or [])) if kind == 3}
    eos += [control[t] for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>") if t in control and control[t] not in eos]
    config.eos_token_ids = eos

    def iter_weights(choose: WeightChooser | None = None, shard: ShardPlan | None = None
                     ) -> Iterator[tuple[str, LoadedWeight]]:
        """`shard`: a tensor-parallel ShardPlan (distributed/sharding.py): each matrix is cut to
        this rank's share before it is converted, so the rank keeps the file's blocks."""
        for name, tensor in tensors.items():
            target = hf_name(name)
            if target is None:
                continue
            if config.architecture == "llama" and (".attn_q." in name or ".attn_k." in name):
                heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
                rows = unpermute_rows(tensor.raw.reshape(tensor.shape[0], -1), heads)  # biases too
                tensor = GGUFTensor(tensor.name, tensor.qtype, tensor.shape, rows.reshape(tensor.raw.shape))
            if name.endswith("ffn_gate_inp_shexp.weight") and len(tensor.shape) == 1:
                tensor = GGUFTensor(tensor.name, tensor.qtype, (1, *tensor.shape), tensor.raw)  # HF's [1, hidden]
            parts = _expert_slices(target, tensor) if name.endswith("_exps.weight") else [(target, tensor)]
            for target, tensor in parts:
                yield from convert(target, tensor, choose, shard)
            gguf.drop_pages(tensors[name])  # every path made its own copy

    def convert(target: str, tensor: GGUFTensor, choose: WeightChooser | None, shard: ShardPlan | None
                ) -> Iterator[tuple[str, LoadedWeight]]:
        if shard is not None:
            part = shard.shard_gguf(target, tensor)
            if isinstance(part, torch.Tensor):  # a cut inside blocks: float values
                yield target, part
                return
            tensor = part
        fmt = choose(target, tensor.shape, tensor.qtype.name) if choose else None
        if fmt is None:
            yield target, tensor.dequantize()
        elif fmt == "rows":  # kept as the file's blocks (a copy: the mapping is released)
            yield target, GGUFRows(torch.from_numpy(np.array(tensor.raw)), tensor.qtype.name, tensor.shape[1])
        elif fmt == "packed":  # the file's blocks, rearranged for sugam's CPU kernels
            yield target, pack_for_kernels(tensor.raw.reshape(tensor.shape[0], -1), tensor.qtype,
                                           (tensor.shape[0], tensor.shape[1]))
        else:  # repacked block by block: no float copy of the whole matrix
            yield target, repack(tensor.raw.reshape(tensor.shape[0], -1), tensor.qtype,
                                 (tensor.shape[0], tensor.shape[1]), fmt)

    types: dict[str, int] = {}
    for t in tensors.values():
        types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
    return LoadedCheckpoint(path=path, config=config, tokenizer=spec,
                            generation=GenerationDefaults(eos_token_ids=eos),
                            iter_weights=iter_weights, info={"format": "gguf", "tensor_types": types,
                                                             "name": meta.get("general.name"), "gguf_file": gguf})


def _tokenizer_spec(path: Path, meta: dict[str, Any], vocab_size: int) -> TokenizerSpec:
    """The tokenizer's pieces, checked against each other and against the embedding."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if meta.get("tokenizer.ggml.model") != "gpt2" or not tokens:
        raise ModelFormatError(
            f"{path}: tokenizer model {meta.get('tokenizer.ggml.model')!r} is not supported "
            f"(sugam builds byte-level BPE tokenizers, tokenizer.ggml.model = 'gpt2')")
    if len(tokens) != vocab_size:  # llama.cpp refuses this too: ids past either end would crash
        raise ModelFormatError(f"{path}: tokenizer.ggml.tokens has {len(tokens)} tokens but token_embd.weight "
                               f"has {vocab_size} rows")
    token_types = meta.get("tokenizer.ggml.token_type")
    if token_types is not None:
        if len(token_types) != len(tokens):
            raise ModelFormatError(f"{path}: tokenizer.ggml.token_type has {len(token_types)} entries for "
                                   f"{len(tokens)} tokens")
        token_types = token_types.tolist()
    spec = TokenizerSpec(
        tokens=tokens,
        token_types=token_types,
        merges=meta.get("tokenizer.ggml.merges"),
        pre_tokenizer=meta.get("tokenizer.ggml.pre"),
        add_bos_token=meta.get("tokenizer.ggml.add_bos_token", False),
        add_eos_token=meta.get("tokenizer.ggml.add_eos_token", False),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        source=str(path),
    )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(spec, key)
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ModelFormatError(f"{path}: tokenizer {key} {token_id} is outside the vocabulary of {len(tokens)}")
    return spec


def _expected_shapes(config: ModelConfig, tensors: dict[str, GGUFTensor]) -> dict[str, tuple[int, ...]]:
    """Every tensor the model reads, with the shape the metadata implies (optional ones only when
    present: a tied head, biases, q/k norms are decided by the tensor list itself)."""
    h, d, f = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (config.vocab_size, h), "output_norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["output.weight"] = (config.vocab_size, h)
    per_layer = {"attn_norm.weight": (h,), "ffn_norm.weight": (h,), "attn_q.weight": (q, h),
                 "attn_k.weight": (kv, h), "attn_v.weight": (kv, h), "attn_output.weight": (h, q)}
    dense: dict[str, tuple[int, ...]] = {"ffn_gate.weight": (f, h), "ffn_up.weight": (f, h), "ffn_down.weight": (h, f)}
    e, fe, fs = config.num_experts, config.moe_intermediate_size, config.shared_expert_intermediate_size
    sparse: dict[str, tuple[int, ...]] = {"ffn_gate_inp.weight": (e, h), "ffn_gate_exps.weight": (e, fe, h), "ffn_up_exps.weight": (e, fe, h),
              "ffn_down_exps.weight": (e, h, fe)}
    if fs:
        sparse.update({"ffn_gate_shexp.weight": (fs, h), "ffn_up_shexp.weight": (fs, h),
                       "ffn_down_shexp.weight": (h, fs), "ffn_gate_inp_shexp.weight": (h,)})
    if config.qkv_bias:
        per_layer.update({"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)})
    if config.o_bias:
        per_layer["attn_output.bias"] = (h,)
    if config.mlp_bias:
        dense.update({"ffn_gate.bias": (f,), "ffn_up.bias": (f,), "ffn_down.bias": (h,)})
    if config.qk_norm:
        per_layer.update({"attn_q_norm.weight": (d,), "attn_k_norm.weight": (d,)})
    for layer in range(config.num_hidden_layers):
        mlp = sparse if config.sparse_layer(layer) else dense
        shapes.update({f"blk.{layer}.{part}": shape for part, shape in (per_layer | mlp).items()})
    return shapes


def _check_shapes(path: Path, config: ModelConfig, tensors: dict[str, GGUFTensor]) -> None:
    """The metadata and the tensors must agree, every layer of them, before anything is allocated."""
    if config.num_hidden_layers > len(tensors):  # before listing what billions of layers would need
        raise ModelFormatError(f"{path}: metadata says {config.num_hidden_layers} layers but the file holds only "
                               f"{len(tensors)} tensors")
    expected = _expected_shapes(config, tensors)
    for name, shape in expected.items():
        got = tensors.get(name)
        if got is None:
            raise ModelFormatError(f"{path}: tensor {name} is missing (block_count is {config.num_hidden_layers})")
        if tuple(got.shape) != shape and not (name.endswith("ffn_gate_inp_shexp.weight") and got.shape == (1, *shape)):
            raise ModelFormatError(f"{path}: tensor {name} has shape {got.shape}, metadata implies {shape}")
    for name in tensors:
        match = _LAYER_RE.match(name)
        if match and int(match.group(1)) >= config.num_hidden_layers:
            raise ModelFormatError(f"{path}: tensor {name} is beyond block_count ({config.num_hidden_layers} layers)")
        if hf_name(name) is not None and name not in expected:
            raise ModelFormatError(f"{path}: tensor {name} does not belong to this model's layout")
