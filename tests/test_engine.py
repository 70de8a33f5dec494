"""Engine behaviour: prefix caching, aborts, and a property test that no KV block ever leaks."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polling import wait_until_async

from sugam import LLM, SamplingParams

SYSTEM = [(13 * i) % 280 + 5 for i in range(70)]  # a long shared "system prompt"


@pytest.fixture(scope="module")
def folder(tiny_models):
    return str(tiny_models["qwen2"][0])


def all_free(llm) -> bool:
    bm = llm.engine.block_manager
    return bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)


def test_shared_prefix_reuses_blocks_and_keeps_outputs(folder):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [SYSTEM + [7, 8, 9], SYSTEM + [10, 11]]
    cold = LLM(folder, dtype="float32", block_size=8, enable_prefix_caching=False)
    expected = [cold.generate([p], params)[0].outputs[0].token_ids for p in prompts]

    llm = LLM(folder, dtype="float32", block_size=8)
    first = llm.generate([prompts[0]], params)[0].outputs[0].token_ids
    stats = llm.engine.block_manager.stats
    assert stats.hit_tokens == 0
    second = llm.generate([prompts[1]], params)[0].outputs[0].token_ids
    assert stats.hit_tokens == len(SYSTEM) // 8 * 8  # every full block of the shared prefix
    assert [first, second] == expected
    again = llm.generate([prompts[0]], params)[0].outputs[0].token_ids  # cached prompt + its own tail
    assert again == expected[0]
    assert all_free(llm)


def test_prefix_is_shared_by_concurrent_requests(folder):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(folder, dtype="float32", block_size=8)
    llm.generate([SYSTEM + [1]], params)  # warm the cache
    outs = llm.generate([SYSTEM + [t] for t in range(2, 8)], params)
    cold = LLM(folder, dtype="float32", block_size=8, enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in outs] == \
        [o.outputs[0].token_ids for o in cold.generate([SYSTEM + [t] for t in range(2, 8)], params)]
    assert all_free(llm)


requests = st.lists(st.tuples(
    st.integers(1, 40),            # prompt length
    st.integers(0, 3),             # which shared prefix (0 = none)
    st.integers(1, 12),            # max_tokens
    st.booleans(),                 # aborted part-way
    st.integers(0, 6),             # arrival step
), min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=requests, pool_tokens=st.sampled_from([48, 96, 400]), speculative=st.sampled_from([None, "ngram", "draft"]))
def test_no_block_leaks_under_random_traffic(folder, reqs, pool_tokens, speculative):
    per_token = 2 * 2 * 2 * 16 * 4  # layers * (k, v) * kv_heads * head_dim * fp32 bytes
    spec = {None: None, "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                  "max_step_rows": 64},
            "draft": {"model": folder, "num_speculative_tokens": 2, "max_step_rows": 64}}[speculative]
    llm = LLM(folder, dtype="float32", block_size=4, kv_cache_memory=per_token * pool_tokens,
              max_num_seqs=6, max_num_batched_tokens=32, speculative_config=spec)
    engine = llm.engine
    prefixes = {0: [], 1: SYSTEM[:9], 2: SYSTEM[:20], 3: SYSTEM[5:17]}
    pending = sorted(enumerate(reqs), key=lambda r: r[1][4])
    live: dict[str, bool] = {}
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][1][4] <= step:
            i, (length, prefix, max_tokens, abort, _) = pending.pop(0)
            prompt = (prefixes[prefix] + [(i * 31 + j) % 250 + 3 for j in range(length)])[:engine.max_model_len - 1]
            seq = engine.add_request(prompt, SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens))
            live[seq.request_id] = abort
        for out in engine.step():
            if live.get(out.request_id) and not out.finished:
                engine.abort_request(out.request_id)
        step += 1
        bm = engine.block_manager
        in_use = sum(len(s.block_table) for s in engine.scheduler.running)
        assert bm.num_used_blocks <= in_use  # shared blocks are counted once
        assert step < 2000
    assert all_free(llm)


def test_async_engine_streams_concurrently_and_frees_aborted(folder):
    import asyncio

    from sugam.engine.async_engine import AsyncLLMEngine

    llm = LLM(folder, dtype="float32")
    params = [SamplingParams(temperature=0, max_tokens=10 + i, ignore_eos=True) for i in range(6)]
    prompts = [[5 + i, 17, 42, 99, 7] for i in range(6)]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    engine = AsyncLLMEngine(llm.engine)

    async def collect(prompt, sp):
        text, last = "", None
        async for out in engine.generate(prompt, sp):
            text += out.outputs[0].delta_text
            last = out
        assert text == last.outputs[0].text
        return last.outputs[0].token_ids

    async def leave_early():
        async for out in engine.generate(prompts[0], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)):
            if len(out.outputs[0].token_ids) >= 3:
                break

    async def main():
        results = await asyncio.gather(*(collect(p, sp) for p, sp in zip(prompts, params)), leave_early())

        def idle():  # the early leaver's abort is applied by the engine loop, between steps
            stats = engine.stats()
            return stats.num_running == stats.num_waiting == 0 and stats.kv_blocks_used == 0

        await wait_until_async(idle, "the aborted request's KV blocks are freed")
        return results[:-1]

    assert asyncio.run(main()) == expected
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_blocks_used == 0
    assert stats.generated_tokens >= sum(len(e) for e in expected)
    assert all_free(llm)


def test_per_request_parameters_in_one_batch(folder):
    """Different temperatures, seeds, stops and lengths share a batch without affecting each other."""
    llm = LLM(folder, dtype="float32")
    prompt = [5, 17, 42, 99, 7]
    greedy_text = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0].text
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.3, seed=7, max_tokens=15, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[greedy_text[8:11]]),
        SamplingParams(temperature=0.8, top_k=5, seed=3, max_tokens=3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=2.0),
    ]
    alone = [llm.generate([prompt], p)[0].outputs[0] for p in params]
    together = llm.generate([prompt] * len(params), params)
    for a, b in zip(alone, together):
        assert (a.token_ids, a.text, a.finish_reason) == (b.outputs[0].token_ids, b.outputs[0].text,
                                                          b.outputs[0].finish_reason)
    assert [len(o.outputs[0].token_ids) for o in together][3] == 3
    assert together[2].outputs[0].finish_reason == "stop"


def test_rolled_back_guesses_leave_no_trace(folder):
    """The contract speculative decoding builds on: a step that computes guessed tokens after each
    sequence's newest one, keeps none of them (update with num_kept) and samples from the first
    row gives exactly the tokens of plain decoding, and every block comes back."""
    from sugam.engine.batch import ForwardBatch

    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = [[5, 17, 42, 99, 7], [8, 9], [30, 31, 32, 33, 34, 35, 36]]
    expected = [o.outputs[0].token_ids for o in LLM(folder, dtype="float32", block_size=4).generate(prompts, params)]

    llm = LLM(folder, dtype="float32", block_size=4)
    engine = llm.engine
    seqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        out = engine.scheduler.schedule()
        for entry in out.scheduled:
            guesses = [(entry.start * 7 + i) % 250 + 3 for i in range(3)]  # wrong on purpose (mostly)
            if entry.samples and engine.block_manager.can_grow(entry.seq, entry.start + entry.num_tokens + 3):
                entry.draft_token_ids = guesses
                engine.block_manager.grow(entry.seq, entry.start + entry.num_tokens)
        batch = ForwardBatch.from_schedule(out, engine.block_manager.block_size, engine.device)
        logits = engine.runner.execute(batch)
        sampling = [e for e in out.scheduled if e.samples]
        first_rows, row = [], 0
        for e in sampling:  # each sequence's row for its newest token; the guesses' rows follow it
            first_rows.append(row)
            row += e.num_logits
        tokens = engine.sampler(logits[first_rows], [e.seq for e in sampling]) if sampling else []
        for e, (token, logprobs) in zip(sampling, tokens):
            engine.outputs.append(e.seq, token, logprobs)
        engine.scheduler.update(out, num_kept=[e.num_new_tokens for e in out.scheduled])
    assert [s.output_token_ids for s in seqs] == expected
    assert all_free(llm)
