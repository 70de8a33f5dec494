"""Speculative decoding: greedy output exactly that of plain decoding, sampled tokens from the same
distribution, and every block back, for prompt lookup and for a draft model."""

from __future__ import annotations

import math
import shutil
from collections import Counter

import pytest
from conftest import build_hf_model, train_tokenizer

from sugam import LLM, SamplingParams
from sugam.engine.speculative import NgramProposer, SpeculativeConfig
from sugam.errors import SugamError

# Tests lift the cap on a step's rows (max_step_rows), so that batches verify guesses too.
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "max_step_rows": 4096}
# Prompts that repeat themselves, so that prompt lookup has something to propose.
PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 9, 10, 11, 9], [30, 31, 32, 33],
           [40 + i % 7 for i in range(30)], [12, 13]]


@pytest.fixture(scope="module")
def folder(tiny_models) -> str:
    return str(tiny_models["qwen2"][0])


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory) -> str:
    """Another random model with the same tokenizer: its guesses are mostly wrong, and its
    distribution q differs from the target's p (the rejection rule's general case)."""
    path = tmp_path_factory.mktemp("draft") / "qwen2"
    build_hf_model(path, "qwen2", seed=1)
    return str(path)


def spec_configs(folder: str, other: str) -> dict[str, dict]:
    return {"ngram": NGRAM, "draft-self": {"model": folder, "num_speculative_tokens": 3, "max_step_rows": 4096},
            "draft-other": {"model": other, "num_speculative_tokens": 3, "max_step_rows": 4096}}


def all_free(llm: LLM) -> bool:
    bm = llm.engine.block_manager
    return bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)


@pytest.mark.parametrize("method", ["ngram", "draft-self", "draft-other"])
def test_greedy_output_is_plain_decoding_exactly(folder, other_draft, method):
    """Batched with other requests, prompts chunked, sequences preempted (a small KV pool), with
    stop strings, a stop token and max_tokens falling inside accepted runs, logprobs reported."""
    spec = spec_configs(folder, other_draft)[method]
    per_token = 2 * 2 * 2 * 16 * 4
    engine_args = dict(dtype="float32", block_size=4, max_num_batched_tokens=8, kv_cache_memory=per_token * 40)
    plain = LLM(folder, **engine_args)
    base = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    reference = [o.outputs[0] for o in plain.generate(PROMPTS, base)]
    # Stops chosen from the plain outputs, so that they fall in the middle of the answers.
    params = [base,
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[reference[1].text[12:16]]),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=[reference[2].token_ids[9]]),
              SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
              base]
    expected = [o.outputs[0] for o in LLM(folder, **engine_args).generate(PROMPTS, params)]
    llm = LLM(folder, **engine_args, speculative_config=spec)
    got = [o.outputs[0] for o in llm.generate(PROMPTS, params)]
    for g, e in zip(got, expected):
        assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == (e.token_ids, e.text, e.finish_reason,
                                                                           e.stop_reason)
    for g, e in zip(got[0].logprobs, expected[0].logprobs):  # one entry per emitted token
        assert g.keys() == e.keys() and all(abs(g[t].logprob - e[t].logprob) < 1e-4 for t in g)
    stats = llm.engine.stats()
    assert stats.speculation.num_draft_tokens > 0
    if method == "draft-self":
        assert stats.speculation.acceptance_rate > 0.9  # the same model guesses its own tokens
    assert llm.engine.scheduler.num_preemptions > 0
    assert all_free(llm)


def test_structured_output_and_seeded_sampling_with_speculation(folder):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
              "required": ["a", "b"]}
    params = SamplingParams(temperature=0, max_tokens=60, json_schema=schema)
    prompt = [5, 6, 7, 8, 5, 6, 7, 8]
    plain = LLM(folder, dtype="float32").generate([prompt], params)[0].outputs[0]
    llm = LLM(folder, dtype="float32", speculative_config={"model": folder, "num_speculative_tokens": 3,
                                                           "max_step_rows": 4096})
    got = llm.generate([prompt], params)[0].outputs[0]
    assert (got.token_ids, got.text) == (plain.token_ids, plain.text)
    # n=2 is two sequences with their own seeds: each reproducible run to run.
    sampled = [SamplingParams(temperature=1.0, max_tokens=20, seed=s, ignore_eos=True) for s in (1, 2)]
    runs = [[o.outputs[0].token_ids for o in llm.generate([prompt, prompt], sampled)] for _ in range(2)]
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1]
    assert all_free(llm)


def chi_square_same(a: Counter, b: Counter) -> tuple[float, float]:
    """(statistic, critical value at p = 0.001) of a two-sample chi-square test of homogeneity;
    categories expected fewer than 5 times are pooled."""
    n_a, n_b = sum(a.values()), sum(b.values())
    total = n_a + n_b
    pooled, cells = [0, 0], []
    for key in set(a) | set(b):
        count = a[key] + b[key]
        if min(count * n_a, count * n_b) / total < 5:
            pooled[0] += a[key]
            pooled[1] += b[key]
        else:
            cells.append((a[key], b[key]))
    if sum(pooled):
        cells.append(tuple(pooled))
    stat = 0.0
    for x, y in cells:
        count = x + y
        for observed, n in ((x, n_a), (y, n_b)):
            expected = count * n / total
            stat += (observed - expected) ** 2 / expected
    df = len(cells) - 1
    z = 3.09  # one-sided 0.001; Wilson-Hilferty's approximation of the chi-square quantile
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, critical


@pytest.mark.parametrize("method", ["ngram", "draft-other"])
def test_sampled_tokens_follow_the_same_distribution(folder, other_draft, method):
    """Many seeded samples with and without speculation: the 2nd to 4th tokens (the ones drawn
    by verification) have the same distribution, through the whole engine. (The rule itself is
    checked on known distributions below, where a wrong rule moves the frequencies by far.)"""
    spec = spec_configs(folder, other_draft)[method]
    prompt = list(range(3, 297))  # every token once: prompt lookup always has a guess
    samples = 800
    # top-k too for the draft: guesses outside the target's top k (p = 0) are always rejected.
    sampling = {"temperature": 1.0} if method == "ngram" else {"temperature": 0.8, "top_k": 40}
    params = [SamplingParams(**sampling, max_tokens=4, ignore_eos=True, seed=s) for s in range(samples)]
    plain = LLM(folder, dtype="float32", max_num_seqs=64).generate([prompt] * samples, params)
    llm = LLM(folder, dtype="float32", max_num_seqs=64, speculative_config=spec)
    speculative = llm.generate([prompt] * samples, [SamplingParams(**{**p.__dict__, "seed": p.seed + samples})
                                                     for p in params])
    stats = llm.engine.stats().speculation
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # both branches of the rule ran
    for position in (1, 2, 3):
        a = Counter(o.outputs[0].token_ids[position] for o in plain)
        b = Counter(o.outputs[0].token_ids[position] for o in speculative)
        stat, critical = chi_square_same(a, b)
        assert stat < critical, (position, stat, critical)
    assert all_free(llm)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = NgramProposer(SpeculativeConfig("ngram", 3, prompt_lookup_max=3, prompt_lookup_min=1)).lookup
    assert lookup([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 1, 2, 3], 3) == [5, 6, 1]  # the 3-gram's latest match
    assert lookup([7, 8, 9, 8], 2) == [9, 8]          # falls back to a 1-gram
    assert lookup([1, 2, 3, 4], 2) == []              # nothing repeats
    assert lookup([4, 4], 5) == [4]                   # proposes what exists


def test_speculative_options_are_checked():
    assert SpeculativeConfig.parse("ngram", 3) == SpeculativeConfig("ngram", 3, prompt_lookup_max=4, prompt_lookup_min=2)
    assert SpeculativeConfig.parse('{"model": "m", "num_speculative_tokens": 2}').method == "draft_model"
    for bad, match in (('{"method": "eagle"}', "method"), ('{"num_speculative_tokens": 0}', "num_speculative_tokens"),
                       ('{"typo": 1}', "unknown speculative option"), ("{not json", "not valid JSON"),
                       ('{"prompt_lookup_min": 5, "prompt_lookup_max": 2}', "prompt_lookup_min")):
        with pytest.raises(SugamError, match=match):
            SpeculativeConfig.parse(bad)


def test_a_draft_with_another_vocabulary_is_refused(folder, tmp_path):
    draft = tmp_path / "draft"
    shutil.copytree(folder, draft)
    (draft / "tokenizer.json").write_text(train_tokenizer(vocab_size=280).to_str())
    with pytest.raises(SugamError, match="another vocabulary"):
        LLM(folder, dtype="float32", speculative_config={"model": str(draft)})


@pytest.mark.parametrize("guesser", ["one-hot", "draft"])
def test_rejection_rule_draws_exactly_from_the_target(guesser):
    """Speculator.verify on known distributions: whatever the guess, the token it emits first is
    distributed as p. (Drawing the replacement from p instead of max(0, p - q), or accepting with
    another probability, moves these frequencies by 10-20 points.)"""
    import torch

    from sugam.engine.output_processor import OutputProcessor
    from sugam.engine.sampler import Sampler
    from sugam.engine.scheduler import ScheduledSequence
    from sugam.engine.sequence import Sequence
    from sugam.engine.speculative import Speculator
    from sugam.loader.base import TokenizerSpec
    from sugam.tokenizer import Tokenizer

    tok = Tokenizer(TokenizerSpec(tokenizer_json=train_tokenizer().to_str()))
    outputs = OutputProcessor(tok, [0], None)
    sampler = Sampler(tok, outputs)
    speculator = Speculator(SpeculativeConfig("ngram", 1), None, 10_000)  # type: ignore[arg-type]
    vocab, support = tok.vocab_size, [50, 51, 52, 53, 54]
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.1, 0.4, 0.2, 0.2])
    row = torch.full((vocab,), -1e9)
    row[support] = p.log()
    rows = torch.stack([row, row])
    q_full = torch.zeros(vocab)
    q_full[support] = q
    params = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True).with_defaults(None)
    generator = torch.Generator().manual_seed(0)
    counts = Counter()
    trials = 6000
    for _ in range(trials):
        seq = Sequence("r", None, [5, 6], params, 10_000, generator, outputs.text_state([5, 6], params))
        entry = ScheduledSequence(seq, 1, 1)
        if guesser == "one-hot":
            entry.draft_token_ids = [51]
        else:
            entry.draft_token_ids = [support[int(torch.multinomial(q, 1, generator=generator))]]
            entry.draft_probs = [q_full]
        speculator.verify(entry, rows, sampler, outputs)
        counts[seq.output_token_ids[0]] += 1
    assert set(counts) <= set(support)
    stat = sum((counts[t] - trials * float(pt)) ** 2 / (trials * float(pt)) for t, pt in zip(support, p))
    assert stat < 18.5, (stat, counts)  # chi-square, 4 degrees of freedom, p = 0.001


@pytest.mark.slow
@pytest.mark.parametrize("target, spec", [
    ("qwen2.5-coder-0.5b-instruct", {"method": "ngram", "num_speculative_tokens": 5}),
    ("qwen2.5-coder-1.5b-instruct", {"model": "qwen2.5-coder-0.5b-instruct", "num_speculative_tokens": 4}),
])
def test_real_models_greedy_equals_plain(target, spec):
    """The default quantized path on real models: prompt lookup on the 0.5B, the 0.5B drafting the
    1.5B; chat prompts batched, one of them asking to repeat code (where guesses succeed)."""
    from sugam.registry import pull

    code = "def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n"
    conversations = [[{"role": "user", "content": f"Rename w to width and h to height:\n\n{code}"}],
                     [{"role": "user", "content": "Name three prime numbers."}],
                     [{"role": "user", "content": "Write a haiku about the sea."}]]
    params = SamplingParams(temperature=0, max_tokens=48)
    path = str(pull(target))
    plain = LLM(path, max_num_seqs=4)
    expected = [o.outputs[0].token_ids for o in plain.chat(conversations, params)]
    del plain
    llm = LLM(path, max_num_seqs=4, speculative_config=spec)
    got = [o.outputs[0].token_ids for o in llm.chat(conversations, params)]
    assert got == expected
    stats = llm.engine.stats().speculation
    assert stats.num_accepted_tokens > 0
    assert all_free(llm)


def test_guesses_are_trimmed_to_the_step_row_cap(folder):
    """On a CPU, a step with guesses stays small (CPU_SPECULATIVE_STEP_ROWS): one stream guesses up
    to k, a full batch guesses nothing (it is compute-bound already), and outputs do not change."""
    from sugam.engine.speculative import CPU_SPECULATIVE_STEP_ROWS

    llm = LLM(folder, dtype="float32", speculative_config={"model": folder, "num_speculative_tokens": 3})
    assert llm.engine.speculator.max_step_rows == CPU_SPECULATIVE_STEP_ROWS
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm.generate([[5, 6, 7]], params)
    assert llm.engine.stats().speculation.num_draft_tokens > 0
    before = llm.engine.stats().speculation.num_draft_tokens
    prompts = [[5 + i, 6, 7] for i in range(CPU_SPECULATIVE_STEP_ROWS)]
    plain = LLM(folder, dtype="float32").generate(prompts, params)
    got = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in plain]
    assert llm.engine.stats().speculation.num_draft_tokens == before  # six decoding rows: no room
