"""Batch invariance (EngineConfig.batch_invariant): a request gets the same logits, to the last bit,
whether it runs alone or among others, with its prompt chunked anywhere."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import build_hf_model, train_tokenizer

from sugam import LLM, SamplingParams
from sugam.errors import SugamError

pytestmark = pytest.mark.skipif(not __import__("sugam.native", fromlist=["available"]).available(),
                                reason="needs sugam's CPU kernels")


def _prompts(count: int, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(3, 40))] for _ in range(count)]


def _logprobs(outputs) -> list[list[float]]:
    """Each request's chosen-token log-probabilities: their bits are the logits' bits."""
    return [[entry[token].logprob for token, entry in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
            for o in outputs]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from gguf.constants import GGMLQuantizationType as QT
    from gguf_writer import write_gguf

    folder = tmp_path_factory.mktemp("invariance")
    model = build_hf_model(folder / "hf", "qwen2", hidden_size=128, intermediate_size=256)
    path = folder / "m.gguf"
    write_gguf(path, model, train_tokenizer(), quant=QT.Q4_0)
    return folder, path


@pytest.mark.parametrize("case", ["gguf-bf16", "gguf-fp32", "int8-bf16"])
def test_a_request_gets_the_same_bits_alone_and_in_any_batch(tiny_gguf, case):
    folder, path = tiny_gguf
    fmt, dtype = case.split("-")
    source = str(path) if fmt == "gguf" else str(folder / "hf")
    kwargs = dict(dtype="float32" if dtype == "fp32" else "bfloat16", quantization=fmt, block_size=8,
                  batch_invariant=True)
    llm = LLM(source, **kwargs)
    prompts = _prompts(24, llm.engine.model_config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    # a token budget below the prompts' total: batched, prompts wait for room or are chunked
    chunked = LLM(source, **kwargs, max_num_batched_tokens=24)
    for engine in (llm, chunked):
        # alone (after a first pass, so that the prefix cache serves some of each prompt), then 24 at once
        alone = [engine.generate([p], params, use_tqdm=False)[0] for p in prompts]
        again = [engine.generate([p], params, use_tqdm=False)[0] for p in prompts[:4]]
        together = engine.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
        assert _logprobs(together) == _logprobs(alone)
        assert _logprobs(again) == _logprobs(alone[:4])
    # the decode steps of all 24 ran through the native decoder where it applies
    if fmt == "gguf":
        assert llm.engine.runner.native_decoder_steps > 0


def test_batch_invariance_refuses_what_it_cannot_keep(tiny_gguf):
    folder, _ = tiny_gguf
    with pytest.raises(SugamError, match="batch invariance needs quantized matrices on a CPU.*dense"):
        LLM(str(folder / "hf"), dtype="float32", quantization="none", batch_invariant=True)


def test_prompt_and_decode_rows_never_share_a_step(tiny_gguf):
    _, path = tiny_gguf
    llm = LLM(str(path), dtype="float32", quantization="gguf", block_size=8, batch_invariant=True,
              max_num_batched_tokens=4)
    kinds = []
    original = llm.engine.runner.execute

    def record(batch):
        decode = batch.attention.decode_tokens
        kinds.append("decode" if decode is not None and len(decode) == batch.num_tokens else "prompt")
        return original(batch)

    llm.engine.runner.execute = record
    engine = llm.engine
    engine.add_request([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    engine.step()
    engine.step()  # the first request decodes
    engine.add_request(list(range(9, 25)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    # a 16-token prompt in chunks of 4 while the first request decodes: the two kinds take turns
    assert kinds[:6] == ["prompt", "decode", "prompt", "decode", "prompt", "decode"]
    assert kinds[6:8] == ["prompt", "decode"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gemm_gives_a_row_the_same_bits_wherever_it_sits_in_a_tile(dtype):
    """What batch invariance assumes of this machine's GEMM (PyTorch's MKL / oneDNN): in tiles of a
    fixed number of rows, a row's result does not depend on its place or on the other rows."""
    from sugam.quant.linear import INVARIANT_TILE_ROWS, _matmul_rows, rows_path

    torch.manual_seed(0)
    rows = 3 * INVARIANT_TILE_ROWS
    for n, k in ((4864, 896), (896, 4864), (1792, 1536)):
        w_t = torch.randn(n, k, dtype=dtype).t()
        x = torch.randn(rows, k, dtype=dtype)
        with rows_path("gemm"):
            base = _matmul_rows(x, w_t)
            perm = torch.randperm(rows)
            assert torch.equal(_matmul_rows(x[perm], w_t), base[perm])
