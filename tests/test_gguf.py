"""GGUF loading: name mapping, llama Q/K un-permutation, quantized types, and refusal of bad files."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch
from conftest import CHATML, build_hf_model, greedy_with_logits, train_tokenizer
from gguf_writer import dequantized_copy, write_gguf, write_out

from sugam import LLM
from sugam.errors import ModelFormatError
from sugam.loader.gguf import GGUFFile, open_gguf

PROMPT = [5, 17, 42, 99, 7, 3, 250, 11]


def reference_logits(model, prompt, tokens):
    with torch.no_grad():
        ids = torch.tensor([prompt + tokens[:-1]])
        return model(ids).logits[0, len(prompt) - 1:]


@pytest.mark.parametrize("arch,pre,extra", [("llama", "smollm", {}), ("qwen2", "qwen2", {}), ("qwen3", "qwen2", {}),
                                            ("llama", "llama-bpe", {"attention_bias": True, "mlp_bias": True})])
def test_gguf_model_matches_transformers(tmp_path, arch, pre, extra):
    model = build_hf_model(tmp_path / "hf", arch, **extra)
    path = tmp_path / "m.gguf"
    write_gguf(path, model, train_tokenizer(), pre=pre, chat_template=CHATML)
    llm = LLM(str(path), dtype="float32")
    tokens, logits = greedy_with_logits(llm, PROMPT, 10)
    ref = reference_logits(model, PROMPT, tokens)
    assert max((a - b).abs().max().item() for a, b in zip(logits, ref)) <= 1e-4
    assert tokens == [int(r.argmax()) for r in ref]


@pytest.mark.parametrize("quant", [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0,
                                   gguf.GGMLQuantizationType.Q5_0, gguf.GGMLQuantizationType.Q4_1,
                                   gguf.GGMLQuantizationType.Q5_1])
def test_quantized_gguf_matches_dequantized_reference(tmp_path, quant):
    model = build_hf_model(tmp_path / "hf", "llama")
    path = tmp_path / "q.gguf"
    write_gguf(path, model, train_tokenizer(), pre="smollm", quant=quant)
    assert {t.qtype for t in GGUFFile(path).tensors.values()} >= {quant}
    llm = LLM(str(path), dtype="float32")
    tokens, logits = greedy_with_logits(llm, PROMPT, 6)
    ref = reference_logits(dequantized_copy(model, quant), PROMPT, tokens)
    assert max((a - b).abs().max().item() for a, b in zip(logits, ref)) <= 1e-4


def test_tensor_values_equal_gguf_reference(tmp_path):
    model = build_hf_model(tmp_path / "hf", "qwen2")
    path = tmp_path / "q.gguf"
    write_gguf(path, model, train_tokenizer(), quant=gguf.GGMLQuantizationType.Q8_0)
    ours = GGUFFile(path).tensors
    for t in gguf.GGUFReader(str(path)).tensors:
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(ours[t.name].dequantize().numpy(), expected.reshape(ours[t.name].shape))


@pytest.fixture
def good_gguf(tmp_path):
    model = build_hf_model(tmp_path / "hf", "qwen2")
    path = tmp_path / "good.gguf"
    write_gguf(path, model, train_tokenizer())
    return path


def test_truncated_file_is_refused_with_its_name(good_gguf, tmp_path):
    data = good_gguf.read_bytes()
    for cut in (10, 200, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError, match="cut"):
            open_gguf(bad)


def test_bad_magic_version_and_counts(tmp_path, good_gguf):
    data = bytearray(good_gguf.read_bytes())
    cases = {
        "magic": (b"GGML" + bytes(data[4:]), "not a GGUF file (bad magic)"),
        "version": (bytes(data[:4]) + struct.pack("<I", 99) + bytes(data[8:]), "GGUF version 99 is not supported"),
        "counts": (bytes(data[:8]) + struct.pack("<Q", 2**40) + bytes(data[16:]),
                   f"header claims {2**40} tensors and"),
    }
    for name, (blob, match) in cases.items():
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(blob)
        with pytest.raises(ModelFormatError) as refused:
            open_gguf(bad)
        assert str(refused.value).startswith(f"{bad}: ") and match in str(refused.value), str(refused.value)


def test_huge_string_length_is_refused(tmp_path):
    blob = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**50) + b"abc"
    bad = tmp_path / "s.gguf"
    bad.write_bytes(blob)
    with pytest.raises(ModelFormatError, match="not plausible|truncated"):
        GGUFFile(bad)


def test_unsupported_tensor_type_and_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "qwen2")
    w.add_tensor("token_embd.weight", np.zeros((4, 84), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q2_K)
    write_out(w)
    with pytest.raises(ModelFormatError, match="Q2_K"):
        GGUFFile(tmp_path / "t.gguf")

    w = gguf.GGUFWriter(str(tmp_path / "a.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    write_out(w)
    with pytest.raises(ModelFormatError, match="unsupported architecture 'mamba'"):
        open_gguf(tmp_path / "a.gguf")

