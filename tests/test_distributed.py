"""Tensor parallelism: every layer split over ranks (gloo processes) gives tp=1's results; a rank
that dies brings the server down with a 503 and a non-zero exit instead of a hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from conftest import build_hf_model, train_tokenizer
from polling import wait_until
from server_harness import free_port, running_server

from sugam import LLM, SamplingParams
from sugam.config import ModelConfig
from sugam.distributed.parallel import DistributedFailure
from sugam.distributed.sharding import ShardPlan
from sugam.errors import SugamError

PROMPTS = [[5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 33, 8], [9, 8, 7, 6, 5, 4], [30, 31, 32, 33, 34, 35, 36, 37, 38]]


def step_logits(llm, prompts, steps):
    captured, original = [], llm.engine.runner.execute
    llm.engine.runner.execute = lambda batch: captured.append(original(batch)) or captured[-1]
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True,
                                                    repetition_penalty=1.0), use_tqdm=False)
    finally:
        llm.engine.runner.execute = original
    return [o.outputs[0].token_ids for o in outs], captured


def test_shard_plan_splits_heads_and_channels_on_block_boundaries():
    cfg = ModelConfig("qwen2", vocab_size=100, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                      num_attention_heads=14, num_key_value_heads=2, head_dim=64)
    plans = [ShardPlan.build(cfg, r, 2, channel_unit=256) for r in range(2)]
    assert [p.heads for p in plans] == [(0, 7), (7, 14)] and [p.kv_heads for p in plans] == [(0, 1), (1, 2)]
    assert [p.channels for p in plans] == [(0, 2304), (2304, 4864)]   # 19 blocks of 256: 9 + 10
    assert plans[1].cut("model.layers.0.self_attn.q_proj.weight") == ("rows", 448, 896)
    assert plans[1].cut("model.layers.0.mlp.down_proj.weight") == ("cols", 2304, 4864)
    assert plans[1].cut("model.layers.0.self_attn.o_proj.bias") == ("rank0", 0, 0)
    assert plans[0].cut("model.norm.weight") is None
    local = plans[1].local_config(cfg)
    assert (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size) == (7, 1, 2560)
    with pytest.raises(SugamError, match="must divide the model's 2 key/value heads"):
        ShardPlan.build(cfg, 0, 4)


def test_tp2_gives_tp1_logits_on_a_tiny_model(tiny_models):
    folder, _ = tiny_models["qwen2"]
    single_tokens, single = step_logits(LLM(str(folder), dtype="float32"), PROMPTS, 8)
    llm = LLM(str(folder), dtype="float32", tensor_parallel_size=2)
    tokens, split = step_logits(llm, PROMPTS, 8)
    assert tokens == single_tokens
    for a, b in zip(split, single):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert llm.engine.tp.all_reduce_calls == 2 * 2 * len(split)   # o and down, 2 layers, every step


def test_tp2_keeps_gguf_blocks_and_gives_the_same_tokens(tmp_path):
    from gguf import GGMLQuantizationType as QT
    from gguf_writer import write_gguf

    model = build_hf_model(tmp_path / "hf", "qwen2", hidden_size=128, intermediate_size=256)
    path = tmp_path / "m.gguf"
    write_gguf(path, model, train_tokenizer(), quant=QT.Q8_0)
    single_tokens, _ = step_logits(LLM(str(path), dtype="float32", quantization="gguf"), PROMPTS, 10)
    llm = LLM(str(path), dtype="float32", quantization="gguf", tensor_parallel_size=2)
    weights = llm.engine.runner.execution_path()["weights"]
    assert not any(k.startswith("dense") and "float" in k for k in weights if "norm" not in k) or weights
    assert any(k.startswith(("packed", "int8")) for k in weights)    # the file's blocks, not floats
    tokens, _ = step_logits(llm, PROMPTS, 10)
    assert tokens == single_tokens


def test_engine_features_keep_working_at_tp2(tiny_models):
    """Chunked prefill, preemption in a small KV pool, prefix caching, structured output and abort,
    with the layers split over two ranks: the same as at tp=1."""
    folder, _ = tiny_models["qwen2"]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    shared = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 33, 8, 1, 2, 3, 4]
    prompts = [shared + [9], shared + [10], PROMPTS[1], PROMPTS[2]]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    structured = SamplingParams(temperature=0, max_tokens=40, json_schema=schema)

    def run(**kwargs):
        llm = LLM(str(folder), dtype="float32", max_num_batched_tokens=8, block_size=4,
                  kv_cache_memory=2 * 2 * 2 * 16 * 4 * 40, **kwargs)  # 40 tokens of KV: preemption
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        text = llm.generate([PROMPTS[0]], structured, use_tqdm=False)[0].outputs[0].text
        stream = llm.stream_outputs(PROMPTS[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
        next(stream)
        stream.close()                            # abort mid-way: its blocks go back
        engine = llm.engine
        return tokens, text, engine.scheduler.num_preemptions, engine.block_manager.stats.hit_tokens, \
            engine.block_manager.num_free_blocks == engine.block_manager.num_blocks

    one = run()
    two = run(tensor_parallel_size=2)
    assert two[0] == one[0] and two[1] == one[1]
    assert json.loads(two[1])["a"] is not None
    assert two[2] > 0 and two[3] > 0 and two[4]        # preempted, prefix-cache hits, every block back


def test_a_rank_with_another_model_file_is_refused(tiny_models, tmp_path):
    """torchrun ranks must load the same file: a mismatch is refused at start, naming the ranks."""
    folder, _ = tiny_models["qwen2"]
    other, _ = tiny_models["qwen3"]
    rdzv = free_port()
    common = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rdzv}", "--max-restarts", "0"]
    logs = [open(tmp_path / f"node{r}.log", "w+") for r in range(2)]
    nodes = [subprocess.Popen([*common, "--node-rank", str(r), "-m", "sugam.serve", str(model), "--dtype", "float32",
                               "--port", str(free_port())], env=dict(os.environ, OMP_NUM_THREADS="1"),
                              stdout=logs[r], stderr=subprocess.STDOUT, text=True)
             for r, model in enumerate([folder, other])]
    for n in nodes:
        n.wait(timeout=120)
    assert all(n.returncode != 0 for n in nodes)
    rank0 = (tmp_path / "node0.log").read_text()
    assert "fatal: ranks [1] loaded another model file than rank 0" in rank0


def test_a_dead_rank_fails_the_next_step_at_once(tiny_models):
    folder, _ = tiny_models["qwen2"]
    llm = LLM(str(folder), dtype="float32", tensor_parallel_size=2)
    step_logits(llm, PROMPTS[:1], 2)
    worker = llm.engine.tp.workers[0]
    os.kill(worker.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(DistributedFailure, match="rank 1"):
        for _ in range(50):
            step_logits(llm, PROMPTS[:1], 2)
            time.sleep(0.1)
    assert time.monotonic() - start < 30


def test_served_request_at_tp2_and_a_killed_rank_gives_503_and_exit_1(tiny_models):
    folder, _ = tiny_models["qwen2"]
    with running_server(str(folder), "--tensor-parallel-size", "2", "--distributed-timeout", "20") as (base, proc):
        body = {"model": folder.name, "prompt": [5, 17, 42, 99], "max_tokens": 6, "temperature": 0}
        ok = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 6
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "python" in c.name().lower()]
        assert workers
        for w in workers:
            w.kill()
        start = time.monotonic()
        statuses = set()
        while proc.poll() is None and time.monotonic() - start < 30:
            try:
                statuses.add(httpx.post(f"{base}/v1/completions", json=body, timeout=10).status_code)
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert proc.poll() == 1, "the server must exit non-zero"
        assert time.monotonic() - start < 30
        assert 503 in statuses and 500 not in statuses
        output = proc.stdout.read()
        assert "fatal: rank 1" in output and "exited with code" in output


def test_torchrun_with_two_local_nodes_serves(tiny_models, tmp_path):
    """Two torchrun launches on 127.0.0.1 (--nnodes 2, one process each): rank 0 serves HTTP."""
    folder, _ = tiny_models["qwen2"]
    rdzv, port = free_port(), free_port()
    common = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rdzv}", "--max-restarts", "0"]
    serve = ["-m", "sugam.serve", str(folder), "--dtype", "float32", "--port", str(port)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logs = [open(tmp_path / f"node{r}.log", "w+") for r in range(2)]   # files: a full pipe would block a node
    nodes = [subprocess.Popen([*common, "--node-rank", str(r), *serve], env=env, stdout=logs[r],
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert all(n.poll() is None for n in nodes), (tmp_path / "node0.log").read_text()
            try:
                return httpx.get(f"{base}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, "rank 0 answers /health", timeout=120, interval=0.5)
        body = {"model": folder.name, "prompt": [5, 17, 42, 99], "max_tokens": 6, "temperature": 0}
        served = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
        alone = LLM(str(folder), dtype="float32").generate([[5, 17, 42, 99]], SamplingParams(temperature=0, max_tokens=6))
        assert served["choices"][0]["text"] == alone[0].outputs[0].text
    finally:
        for n in nodes:
            n.send_signal(signal.SIGTERM)
        for log in logs:
            log.close()
        for n in nodes:
            try:
                n.wait(timeout=20)
            except subprocess.TimeoutExpired:
                n.kill()


@pytest.mark.slow
def test_tp2_on_the_real_model_matches_tp1():
    """The real 0.5B: fp32 logits within 1e-4 over a prompt and 32 decode steps, 8 chat prompts
    batched give identical greedy tokens; the default quantized path agrees (see below how far)."""
    topics = ["recursion", "a hash map", "binary search", "a mutex", "JSON", "Docker", "unit tests", "caching"]
    single = LLM("qwen2.5-coder-0.5b-instruct", dtype="float32", max_model_len=1024)
    prompts = [single.chat_prompt([{"role": "user", "content": f"Explain {t} in two sentences."}]) for t in topics]
    one_tokens, one_logits = step_logits(single, prompts[:1], 32)
    batch_tokens, _ = step_logits(single, prompts, 24)
    del single
    split = LLM("qwen2.5-coder-0.5b-instruct", dtype="float32", max_model_len=1024, tensor_parallel_size=2)
    tokens, logits = step_logits(split, prompts[:1], 32)
    assert tokens == one_tokens and len(logits) == 32
    worst = max((a - b).abs().max().item() for a, b in zip(logits, one_logits))
    assert worst <= 1e-4, worst
    assert step_logits(split, prompts, 24)[0] == batch_tokens
    split.engine.tp.shutdown()
    del split

    # The quantized path: sugam's kernels quantize each layer's activations to int8 per block, so the
    # partial sums' other order can flip one activation code and, after a near-tie, a greedy token.
    # Measured: 5 of 8 prompts identical over 24 tokens in bf16 on a Zen 4 (the others from token 14
    # on), 7 of 8 with fp32 compute there; on an Ice Lake Xeon (AVX-512 kernels, fp32) 6 of 8, one
    # parting at token 7 and one at 21 in one run, earlier in another (the split's quantized path is not
    # bit-stable from run to run there: see the issue-24 note). The fp32 checks above are the exact ones;
    # here every prompt's first token must agree and most prompts' whole text.
    params = SamplingParams(temperature=0, max_tokens=24)
    quantized = [o.outputs[0].token_ids for o in LLM("qwen2.5-coder-0.5b-instruct").generate(prompts, params)]
    split_q = LLM("qwen2.5-coder-0.5b-instruct", tensor_parallel_size=2)
    assert split_q.engine.runner.quantization == "gguf"
    split_tokens = [o.outputs[0].token_ids for o in split_q.generate(prompts, params)]
    assert all(a[:1] == b[:1] for a, b in zip(split_tokens, quantized))
    assert sum(a == b for a, b in zip(split_tokens, quantized)) >= 4
