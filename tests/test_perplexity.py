"""Perplexity against transformers' own sliding-window NLL on the same tokens."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from conftest import CORPUS

from sugam import LLM
from sugam.evaluate import window_spans

TEXT = " ".join(CORPUS * 6)


def reference_nll(model, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    total, count = 0.0, 0
    for start, end, first in window_spans(len(ids), context, stride):
        with torch.no_grad():
            logits = model(torch.tensor([ids[start:end]])).logits[0].float()
        logprobs = logits.log_softmax(-1)
        for pos in range(first, end):
            total -= float(logprobs[pos - start - 1, ids[pos]])
            count += 1
    return total / count, count


def test_windows_score_every_token_once():
    for n, ctx, stride in [(10, 4, 2), (10, 4, 4), (7, 16, 8), (100, 32, 5)]:
        scored = [p for _, end, first in window_spans(n, ctx, stride) for p in range(first, end)]
        assert scored == list(range(1, n))


@pytest.mark.parametrize("context,stride", [(64, 32), (48, 48)])
def test_perplexity_matches_transformers(tiny_models, context, stride):
    folder, model = tiny_models["qwen2"]
    llm = LLM(str(folder), dtype="float32", block_size=8)
    ids = llm.get_tokenizer().encode(TEXT)
    assert len(ids) > 3 * context
    result = llm.perplexity(TEXT, context=context, stride=stride)
    ref_nll, ref_count = reference_nll(model, ids, context, stride)
    assert result.tokens_scored == ref_count == len(ids) - 1
    assert abs(result.mean_nll - ref_nll) < 1e-4
    assert math.isclose(result.perplexity, math.exp(ref_nll), rel_tol=1e-4)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # the borrowed blocks went back


def test_chunked_windows_read_the_kv_cache_and_its_format(tiny_models):
    """With `chunk`, later parts of a window attend to cached keys and values: the same result as the
    whole window at once with an fp32 cache, and a small difference where the cache is bf16 or int8."""
    folder, model = tiny_models["qwen2"]
    ids = LLM(str(folder), dtype="float32", block_size=8).get_tokenizer().encode(TEXT)
    ref_nll, _ = reference_nll(model, ids, 64, 32)
    nll = {}
    for kv in ("auto", "bf16", "int8"):
        llm = LLM(str(folder), dtype="float32", block_size=8, kv_cache_dtype=kv)
        whole = llm.perplexity(TEXT, context=64, stride=32)
        chunked = llm.perplexity(TEXT, context=64, stride=32, chunk=16)
        assert chunked.tokens_scored == whole.tokens_scored
        assert abs(whole.mean_nll - ref_nll) < 1e-4  # the whole window never reads the cache
        nll[kv] = chunked.mean_nll
    assert abs(nll["auto"] - ref_nll) < 1e-4
    for kv in ("bf16", "int8"):
        assert 0 < abs(nll[kv] - ref_nll) < 0.01 * ref_nll, nll


def test_perplexity_cli(tiny_models, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = subprocess.run([sys.executable, "-m", "sugam", "perplexity", str(tiny_models["qwen2"][0]), str(text),
                          "--context", "64", "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "perplexity" in out.stdout and "tokens" in out.stdout
    missing = subprocess.run([sys.executable, "-m", "sugam", "perplexity", str(tiny_models["qwen2"][0]),
                              str(tmp_path / "nope.txt")], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "nope.txt" in missing.stderr and "Traceback" not in missing.stderr
