"""Test helper: writes a small GGUF model without transformers, and takes GGUF files apart and
back together so that tests can corrupt one field at a time.

The reader here is deliberately separate from sugam's parser: it records where each field lies
(so a fuzzer can overwrite it) and keeps every value as raw bytes (so a value of a wrong type
survives the round trip).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf_writer import add_tokenizer, write_out

SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9


@dataclass
class Field:
    """One fixed-size number in the file: where it is, its struct format and what it means."""
    offset: int
    fmt: str
    label: str


@dataclass
class KV:
    key: str
    vtype: int
    raw: bytes  # the value's bytes, exactly as in the file


@dataclass
class TensorInfo:
    name: str
    dims: list[int]
    type_id: int
    offset: int


@dataclass
class Layout:
    version: int
    kvs: list[KV]
    tensors: list[TensorInfo]
    data: bytes               # everything from the aligned start of the tensor data to the end
    alignment: int = 32
    fields: list[Field] = field(default_factory=list)  # numbers found while reading

    def kv(self, key: str) -> KV:
        return next(kv for kv in self.kvs if kv.key == key)

    def tensor(self, name: str) -> TensorInfo:
        return next(t for t in self.tensors if t.name == name)


def _read_value(blob: bytes, pos: int, vtype: int, label: str, fields: list[Field]) -> int:
    """Skips one value, recording its numeric fields; returns the position after it."""
    if vtype in SCALAR_SIZES:
        fields.append(Field(pos, {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[SCALAR_SIZES[vtype]], label))
        return pos + SCALAR_SIZES[vtype]
    if vtype == STRING:
        fields.append(Field(pos, "<Q", f"{label} length"))
        (n,) = struct.unpack_from("<Q", blob, pos)
        return pos + 8 + n
    if vtype == ARRAY:
        item, count = struct.unpack_from("<IQ", blob, pos)
        fields.append(Field(pos, "<I", f"{label} item type"))
        fields.append(Field(pos + 4, "<Q", f"{label} count"))
        pos += 12
        for i in range(count):
            pos = _read_value(blob, pos, item, f"{label}[{i}]", fields if i < 4 or i == count - 1 else [])
        return pos
    raise ValueError(f"unknown type {vtype}")


def read_layout(blob: bytes) -> Layout:
    fields = [Field(4, "<I", "version"), Field(8, "<Q", "n_tensors"), Field(16, "<Q", "n_kv")]
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", blob, 4)
    pos, kvs = 24, []
    for i in range(n_kv):
        fields.append(Field(pos, "<Q", f"key #{i} length"))
        (n,) = struct.unpack_from("<Q", blob, pos)
        key = blob[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        (vtype,) = struct.unpack_from("<I", blob, pos)
        fields.append(Field(pos, "<I", f"{key} type"))
        start = _read_value(blob, pos + 4, vtype, key, fields)
        kvs.append(KV(key, vtype, blob[pos + 4:start]))
        pos = start
    tensors = []
    for _ in range(n_tensors):
        (n,) = struct.unpack_from("<Q", blob, pos)
        fields.append(Field(pos, "<Q", "tensor name length"))
        name = blob[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        fields.append(Field(pos, "<I", f"{name} n_dims"))
        (n_dims,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        dims = list(struct.unpack_from(f"<{n_dims}Q", blob, pos))
        fields += [Field(pos + 8 * j, "<Q", f"{name} dim {j}") for j in range(n_dims)]
        pos += 8 * n_dims
        type_id, offset = struct.unpack_from("<IQ", blob, pos)
        fields += [Field(pos, "<I", f"{name} type"), Field(pos + 4, "<Q", f"{name} offset")]
        pos += 12
        tensors.append(TensorInfo(name, dims, type_id, offset))
    alignment = 32
    for kv in kvs:
        if kv.key == "general.alignment" and kv.vtype == 4:
            alignment = struct.unpack("<I", kv.raw)[0]
    data_start = -(-pos // alignment) * alignment
    return Layout(version, kvs, tensors, blob[data_start:], alignment, fields)


def encode_string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def write_layout(layout: Layout, n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
    """The file again; counts can be overridden to disagree with the lists."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", layout.version,
                                          len(layout.tensors) if n_tensors is None else n_tensors,
                                          len(layout.kvs) if n_kv is None else n_kv))
    for kv in layout.kvs:
        out += encode_string(kv.key) + struct.pack("<I", kv.vtype) + kv.raw
    for t in layout.tensors:
        out += encode_string(t.name) + struct.pack("<I", len(t.dims)) + struct.pack(f"<{len(t.dims)}Q", *t.dims)
        out += struct.pack("<IQ", t.type_id, t.offset)
    out += bytes(-len(out) % layout.alignment)
    return bytes(out + layout.data)


# ---- a small model written directly (no transformers) -----------------------------------------

def tiny_gguf(path: Path, tokenizer, arch: str = "qwen2", hidden: int = 64, layers: int = 2, heads: int = 4,
              kv_heads: int = 2, ffn: int = 128, seed: int = 0, chat_template: str | None = None) -> Path:
    """A random Qwen2- or Llama-shaped GGUF: Q8_0 attention and MLP matrices, F32 the rest."""
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (("block_count", layers), ("context_length", 256), ("embedding_length", hidden),
                       ("feed_forward_length", ffn), ("attention.head_count", heads),
                       ("attention.head_count_kv", kv_heads), ("attention.key_length", head_dim)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    vocab_size = add_tokenizer(w, tokenizer, "qwen2", chat_template)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = rng.standard_normal((rows, cols), dtype=np.float32) * 0.1
        q8 = gguf.GGMLQuantizationType.Q8_0
        w.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)

    def vector(name: str, size: int) -> None:
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(size)).astype(np.float32))

    w.add_tensor("token_embd.weight", rng.standard_normal((vocab_size, hidden), dtype=np.float32) * 0.1)
    for i in range(layers):
        vector(f"blk.{i}.attn_norm.weight", hidden)
        for part, rows in (("attn_q", heads * head_dim), ("attn_k", kv_heads * head_dim), ("attn_v", kv_heads * head_dim)):
            matrix(f"blk.{i}.{part}.weight", rows, hidden)
            if arch == "qwen2":
                vector(f"blk.{i}.{part}.bias", rows)
        matrix(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        vector(f"blk.{i}.ffn_norm.weight", hidden)
        matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, ffn)
    vector("output_norm.weight", hidden)
    write_out(w)
    return path
