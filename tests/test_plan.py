"""`sugam plan`: parameter counts, the claim that made this project, and prediction vs measured RSS."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sugam.config import ModelConfig
from sugam.errors import SugamError
from sugam.plan import KNOWN, dense_params, kv_bytes_per_token, plan, resolve_shape


def test_parameter_counts_match_transformers(tiny_models):
    for folder, model in tiny_models.values():
        cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
        assert dense_params(cfg) == sum(p.numel() for p in model.parameters())


def test_published_sizes():
    # Published sizes: Qwen2.5-0.5B 0.49B, 7B 7.62B, 32B 32.8B, 72B 72.7B; Qwen3-8B 8.2B.
    for name, billions in [("qwen2.5-0.5b", 0.49), ("qwen2.5-7b", 7.62), ("qwq-32b", 32.76), ("qwen2.5-72b", 72.7),
                           ("qwen3-8b", 8.19)]:
        assert abs(KNOWN[name].params / 1e9 - billions) / billions < 0.01, name


def test_qwq_in_4_bit_fits_a_desktop_and_r1_does_not():
    # a bf16 KV cache (the default on every CPU); fp32 K/V (--dtype float32) are twice the size
    rows = {r.format.name: r for r in plan(KNOWN["qwq-32b"], context=8192, concurrency=1, memory=24 * 10**9,
                                           kv_element_bytes=2)}
    assert rows["int4"].fits and rows["q4_k_m"].fits and not rows["bf16"].fits
    fp32 = {r.format.name: r for r in plan(KNOWN["qwq-32b"], context=8192, concurrency=1, memory=24 * 10**9,
                                           kv_element_bytes=4)}
    assert fp32["int4"].kv_cache == 2 * rows["int4"].kv_cache
    assert all(not r.fits for r in plan(KNOWN["deepseek-r1"], context=8192, concurrency=1, memory=32 * 10**9))
    assert all(not r.fits for r in plan(KNOWN["deepseek-r1"], context=8192, concurrency=1, memory=256 * 10**9))
    # KV grows with context and concurrency
    assert kv_bytes_per_token(KNOWN["qwq-32b"]) == 64 * 2 * 8 * 128 * 2
    # an int8 cache: one byte an element plus a float32 scale per 128-element vector
    assert kv_bytes_per_token(KNOWN["qwq-32b"], int8=True) == 64 * 2 * 8 * (128 + 4)


def test_int8_kv_prediction_matches_the_engine_pool(tiny_models):
    from sugam import LLM
    from sugam.engine.runner import kv_bytes_per_token as engine_kv_bytes

    folder = tiny_models["qwen2"][0]
    shape = resolve_shape(str(folder))
    llm = LLM(str(folder), kv_cache_dtype="int8")
    cfg = llm.engine.model_config
    assert kv_bytes_per_token(shape, int8=True) == engine_kv_bytes(cfg, llm.engine.runner.dtype, True)
    assert kv_bytes_per_token(shape, element_bytes=llm.engine.runner.dtype.itemsize) == engine_kv_bytes(
        cfg, llm.engine.runner.dtype)


def test_plan_cli(tiny_models):
    out = subprocess.run([sys.executable, "-m", "sugam", "plan", "qwq-32b", "--memory", "24GB"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "int4" in out.stdout and "fits in 24 GB" in out.stdout
    local = subprocess.run([sys.executable, "-m", "sugam", "plan", str(tiny_models["qwen2"][0]), "--context", "256"],
                           capture_output=True, text=True, timeout=120)
    assert local.returncode == 0 and "context 256" in local.stdout
    bad = subprocess.run([sys.executable, "-m", "sugam", "plan", "qwq-32b", "--memory", "lots"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "lots" in bad.stderr


MEASURE = """
import sys
from sugam import LLM, SamplingParams
llm = LLM(sys.argv[1], max_model_len=int(sys.argv[2]), max_num_seqs=1)
llm.generate(["hello " * 300], SamplingParams(max_tokens=32))
print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmRSS')))
"""


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"])
def test_prediction_matches_measured_rss(alias):
    from sugam.registry import pull

    pull(alias, progress=False)
    context = 8192
    out = subprocess.run([sys.executable, "-c", MEASURE, alias, str(context)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    measured = int(out.stdout.strip().splitlines()[-1])
    # The default on CPU keeps the GGUF quantized: the "gguf" row is the one to match.
    predicted = next(r for r in plan(resolve_shape(alias), context, 1, None) if r.format.name == "gguf").total
    print(alias, "predicted", predicted, "measured", measured)
    assert abs(predicted - measured) / measured < 0.10, (predicted, measured)


def test_tensor_parallel_plan_is_per_device():
    shape = KNOWN["qwq-32b"]
    whole = {r.format.name: r for r in plan(shape, 8192, 1, 16 * 10**9)}
    split = {r.format.name: r for r in plan(shape, 8192, 1, 16 * 10**9, tensor_parallel_size=2)}
    assert split["int4"].kv_cache * 2 == whole["int4"].kv_cache
    # half the layers, but the embedding and the LM head whole on rank 0
    assert whole["int4"].weights / 2 < split["int4"].weights < whole["int4"].weights * 0.6
    assert split["int4"].fits and not whole["int4"].fits
    with pytest.raises(SugamError, match="must divide the model's 8 key/value heads"):
        plan(shape, 8192, 1, None, tensor_parallel_size=3)
