"""Corrupted and hostile GGUF files: each is refused with a one-line ModelFormatError that names
the file and the field, in time and memory proportionate to the file, or loads correctly; a
seeded fuzzer over the header, the metadata and the tensor table checks that nothing else ever
happens."""

from __future__ import annotations

import random
import struct
import time
import tracemalloc

import pytest
from conftest import train_tokenizer
from gguf_layout import (
    ARRAY,
    KV,
    STRING,
    encode_string,
    read_layout,
    tiny_gguf,
    write_layout,
)

from sugam.errors import ModelFormatError
from sugam.loader.gguf import GGUFFile, open_gguf
from sugam.tokenizer import Tokenizer

Q8_0, Q4_0, F32, F16 = 8, 2, 0, 1


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    path = tiny_gguf(tmp_path_factory.mktemp("gguf") / "good.gguf", train_tokenizer())
    return path.read_bytes()


def load_all(path):
    """Everything loading does with the header: parse, config, shapes, tokenizer, every weight."""
    checkpoint = open_gguf(path)
    tokenizer = Tokenizer(checkpoint.tokenizer)
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"
    shapes = {name: tuple(w.shape) for name, w in checkpoint.iter_weights()}
    assert shapes["model.embed_tokens.weight"] == (checkpoint.config.vocab_size, checkpoint.config.hidden_size)
    return checkpoint


def refused(tmp_path, blob: bytes, match: str, name: str = "bad.gguf") -> str:
    path = tmp_path / name
    path.write_bytes(blob)
    with pytest.raises(ModelFormatError) as error:
        load_all(path)
    message = str(error.value)
    assert message.startswith(str(path)), message  # the file is named
    assert "\n" not in message
    assert match in message, message
    return message


def scalar_kv(key: str, vtype: int, fmt: str, value) -> KV:
    return KV(key, vtype, struct.pack(fmt, value))


def replace_kv(layout, key: str, kv: KV):
    """The file with `key` set to `kv` (added when the file lacks it)."""
    if any(k.key == key for k in layout.kvs):
        layout.kvs = [kv if k.key == key else k for k in layout.kvs]
    else:
        layout.kvs.append(kv)
    return layout


def test_the_tiny_file_loads_and_round_trips(good, tmp_path):
    assert write_layout(read_layout(good)) == good
    (tmp_path / "m.gguf").write_bytes(good)
    assert load_all(tmp_path / "m.gguf").config.num_hidden_layers == 2


# ---- item 2: corrupted files that loaded anyway -----------------------------------------------

@pytest.mark.parametrize("change,match", [
    (lambda t, first: 0, "overlaps the data of"),                   # attn_q on top of token_embd
    (lambda t, first: t.offset + 1, "not a multiple of general.alignment"),
    (lambda t, first: t.offset + 3, "not a multiple of general.alignment"),
    (lambda t, first: t.offset + 32, "leaves a gap of 32 bytes"),
    (lambda t, first: t.offset - 32, "overlaps the data of"),
])
def test_tensor_offsets_must_follow_one_another(good, tmp_path, change, match):
    layout = read_layout(good)
    tensor = layout.tensor("blk.0.attn_q.weight")
    tensor.offset = change(tensor, layout.tensors[0])
    refused(tmp_path, write_layout(layout), f"tensor 'blk.0.attn_q.weight' has data offset {tensor.offset}")
    refused(tmp_path, write_layout(layout), match)


def test_one_tensor_too_many_in_the_header(good, tmp_path):
    layout = read_layout(good)
    n = len(layout.tensors)
    # the table's extra entry is read from the padding after it: a tensor with an empty name
    refused(tmp_path, write_layout(layout, n_tensors=n + 1), f"tensor #{n} has a name of 0 bytes")


@pytest.mark.parametrize("name,new_type,match", [
    ("blk.0.attn_q.weight", Q4_0, "it leaves a gap of 2048 bytes after 'blk.0.attn_q.weight'"),
    ("blk.1.ffn_down.weight", Q4_0, "it leaves a gap of 4096 bytes after 'blk.1.ffn_down.weight'"),
    ("blk.0.attn_norm.weight", F16, "it leaves a gap of 128 bytes after 'blk.0.attn_norm.weight'"),
    ("output_norm.weight", F16, "128 bytes follow the last tensor's data"),
])
def test_a_tensor_type_changed_to_another_of_the_same_shape(good, tmp_path, name, new_type, match):
    layout = read_layout(good)
    layout.tensor(name).type_id = new_type
    refused(tmp_path, write_layout(layout), match)  # its bytes no longer add up: refused, not misread


def test_embedding_rows_must_equal_the_tokenizer_size(good, tmp_path):
    layout = read_layout(good)
    tokens = layout.kv("tokenizer.ggml.tokens")
    item_type, count = struct.unpack_from("<IQ", tokens.raw)
    pos = 12
    strings = []
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", tokens.raw, pos)
        strings.append(tokens.raw[pos:pos + 8 + n])
        pos += 8 + n
    tokens.raw = struct.pack("<IQ", item_type, count - 1) + b"".join(strings[:-1])
    refused(tmp_path, write_layout(layout), f"has {count - 1} tokens but token_embd.weight has {count} rows")


def test_duplicate_keys_and_tensor_names(good, tmp_path):
    layout = read_layout(good)
    layout.kvs.append(scalar_kv("qwen2.block_count", 4, "<I", 1))  # the second block_count would win
    refused(tmp_path, write_layout(layout), "metadata key 'qwen2.block_count' appears twice")

    layout = read_layout(good)
    layout.tensor("blk.1.attn_norm.weight").name = "blk.0.attn_norm.weight"
    refused(tmp_path, write_layout(layout), "tensor 'blk.0.attn_norm.weight' appears twice")


def test_bytes_after_the_last_tensor(good, tmp_path):
    refused(tmp_path, good + bytes(64), "64 bytes follow the last tensor")


# ---- item 3: memory and time in proportion to the file ------------------------------------------

def test_a_byte_array_running_to_the_end_costs_no_memory(good, tmp_path):
    layout = read_layout(good)
    tail = 30 * 2**20
    layout.data = layout.data + bytes(tail)
    blob = bytearray(write_layout(layout))
    field = next(f for f in layout.fields if f.label == "tokenizer.ggml.token_type item type")
    struct.pack_into("<IQ", blob, field.offset, 0, len(blob) - field.offset - 12)  # u8, up to the end
    path = tmp_path / "u8.gguf"
    path.write_bytes(blob)
    tracemalloc.start()
    try:
        with pytest.raises(ModelFormatError, match="truncated"):
            GGUFFile(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB for a {len(blob) / 2**20:.0f} MiB file"


def test_millions_of_empty_strings_are_refused_before_they_are_read(tmp_path):
    count = (1 << 22) + 1
    blob = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + encode_string("junk") + struct.pack("<IIQ", ARRAY, STRING, count)
    path = tmp_path / "strings.gguf"
    path.write_bytes(blob + bytes(8 * count))
    start = time.process_time()   # CPU time: the work done, whatever else the machine runs
    with pytest.raises(ModelFormatError, match="strings in metadata arrays"):
        GGUFFile(path)
    assert time.process_time() - start < 1.0  # refused before the 4 M strings are read


# ---- item 4: one-line errors instead of raw exceptions ------------------------------------------

FLOAT_KV = {"nan": float("nan"), "inf": float("inf")}


@pytest.mark.parametrize("key,kv,match", [
    ("qwen2.attention.head_count", scalar_kv("qwen2.attention.head_count", 4, "<I", 0),
     "qwen2.attention.head_count must be a positive integer"),
    ("general.alignment", scalar_kv("general.alignment", 6, "<f", float("nan")),
     "general.alignment must be a non-negative integer, not float32 nan"),
    ("general.alignment", scalar_kv("general.alignment", 6, "<f", float("inf")),
     "general.alignment must be a non-negative integer"),
    ("general.alignment", KV("general.alignment", ARRAY, struct.pack("<IQ", 4, 1) + struct.pack("<I", 32)),
     "general.alignment must be a non-negative integer, not an array of uint32"),
    ("general.alignment", scalar_kv("general.alignment", 4, "<I", 48), "general.alignment 48 is not a power of two"),
    ("general.architecture", KV("general.architecture", ARRAY, struct.pack("<IQ", STRING, 1) + encode_string("qwen2")),
     "general.architecture must be a string, not an array of string"),
    ("tokenizer.ggml.eos_token_id", KV("tokenizer.ggml.eos_token_id", STRING, encode_string("5")),
     "tokenizer.ggml.eos_token_id must be a non-negative integer, not string"),
    ("tokenizer.ggml.eos_token_id", scalar_kv("tokenizer.ggml.eos_token_id", 6, "<f", 5.0),
     "tokenizer.ggml.eos_token_id must be a non-negative integer, not float32"),
    ("tokenizer.ggml.eos_token_id", scalar_kv("tokenizer.ggml.eos_token_id", 4, "<I", 10**6),
     "eos_token_id 1000000 is outside the vocabulary"),
    ("tokenizer.ggml.add_bos_token", KV("tokenizer.ggml.add_bos_token", STRING, encode_string("false")),
     "tokenizer.ggml.add_bos_token must be a boolean, not string 'false'"),
    ("tokenizer.chat_template", scalar_kv("tokenizer.chat_template", 4, "<I", 7),
     "tokenizer.chat_template must be a string, not uint32"),
    ("qwen2.attention.layer_norm_rms_epsilon", scalar_kv("qwen2.attention.layer_norm_rms_epsilon", 6, "<f", float("nan")),
     "qwen2.attention.layer_norm_rms_epsilon must be a finite number"),
    ("qwen2.block_count", scalar_kv("qwen2.block_count", 4, "<I", 0), "qwen2.block_count must be a positive integer"),
    ("qwen2.block_count", scalar_kv("qwen2.block_count", 4, "<I", 1), "tensor blk.1.attn_norm.weight is beyond"),
    ("qwen2.block_count", scalar_kv("qwen2.block_count", 4, "<I", 3), "tensor blk.2.attn_norm.weight is missing"),
    ("qwen2.embedding_length", scalar_kv("qwen2.embedding_length", 4, "<I", 96),
     "tensor token_embd.weight has shape (304, 64), metadata implies (304, 96)"),
    ("general.architecture", KV("general.architecture", STRING, encode_string("mamba")),
     "unsupported architecture 'mamba'"),
    ("tokenizer.ggml.token_type", KV("tokenizer.ggml.token_type", ARRAY, struct.pack("<IQ", 5, 2) + bytes(8)),
     "tokenizer.ggml.token_type has 2 entries"),
])
def test_bad_metadata_values_are_one_line_errors(good, tmp_path, key, kv, match):
    layout = replace_kv(read_layout(good), key, kv)
    refused(tmp_path, write_layout(layout), match)


def test_deeply_nested_arrays(good, tmp_path):
    depth = 2000
    value = struct.pack("<IQ", ARRAY, 1) * (depth - 1) + struct.pack("<IQ", 4, 1) + struct.pack("<I", 1)
    layout = read_layout(good)
    layout.kvs.append(KV("junk.nested", ARRAY, value))
    refused(tmp_path, write_layout(layout), "junk.nested[0][0][0] nests arrays more than 3 deep")


def test_a_flipped_byte_in_the_merges(good, tmp_path):
    blob = bytearray(good)
    layout = read_layout(good)
    field = next(f for f in layout.fields if f.label == "tokenizer.ggml.merges[2] length")
    blob[field.offset + 8] = 0x7F  # a byte no byte-level BPE vocabulary spells as itself
    refused(tmp_path, bytes(blob), "tokenizer.ggml.merges does not fit tokenizer.ggml.tokens")


# ---- the fuzzer ----------------------------------------------------------------------------------

INTERESTING = [0, 1, 2, 3, 7, 31, 32, 33, 255, 256, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**63 - 1, 2**63, 2**64 - 1]


def mutations(blob: bytes, rng: random.Random, n: int):
    """(label, mutated bytes): a number of the header, metadata or tensor table set to an edge
    value, off by one, or random; a byte flipped in the strings; or the file cut short."""
    layout = read_layout(blob)
    header_end = len(blob) - len(layout.data)
    for i in range(n):
        kind = rng.random()
        out = bytearray(blob)
        if kind < 0.75:
            f = rng.choice(layout.fields)
            bits = struct.calcsize(f.fmt) * 8
            (old,) = struct.unpack_from(f.fmt, out, f.offset)
            choice = rng.random()
            if choice < 0.5:
                new = rng.choice(INTERESTING)
            elif choice < 0.8:
                new = old + rng.choice([-1, 1, -8, 8, 32, -32])
            else:
                new = rng.getrandbits(bits)
            new %= 1 << bits
            struct.pack_into(f.fmt, out, f.offset, new)
            yield f"#{i} {f.label}: {old} -> {new}", bytes(out)
        elif kind < 0.93:
            pos = rng.randrange(24, header_end)
            out[pos] ^= 1 << rng.randrange(8)
            yield f"#{i} bit flip at {pos}", bytes(out)
        else:
            cut = rng.randrange(0, len(blob))
            yield f"#{i} cut at {cut}", bytes(out[:cut])


def test_fuzzed_headers_load_correctly_or_fail_cleanly(good, tmp_path):
    """Each mutated file is either refused with a ModelFormatError naming it, or loads completely
    (config, every tensor shape, a working tokenizer); parsing never takes more than a few times
    the file in memory, and no case takes long."""
    rng = random.Random(20240518)
    path = tmp_path / "fuzz.gguf"
    outcomes = {"refused": 0, "loaded": 0}
    budget = 4 * len(good) + 8 * 2**20
    for label, blob in mutations(good, rng, 1000):
        path.write_bytes(blob)
        start = time.process_time()   # CPU time, not wall-clock: a loaded machine must not fail a case
        tracemalloc.start()
        try:
            try:
                GGUFFile(path)
            except ModelFormatError:
                pass
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < budget, f"{label}: parsing took {peak / 2**20:.1f} MiB"
        try:
            load_all(path)
            outcomes["loaded"] += 1
        except ModelFormatError as exc:
            assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc), f"{label}: {exc}"
            outcomes["refused"] += 1
        except Exception as exc:  # the point of the test: nothing but a clean refusal
            raise AssertionError(f"{label}: {type(exc).__name__}: {exc}") from exc
        assert time.process_time() - start < 5, f"{label}: took {time.process_time() - start:.1f} s of CPU"
    assert outcomes["refused"] > 700 and outcomes["loaded"] > 40, outcomes
