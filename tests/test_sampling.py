"""Sampling parameters through the engine: greedy, seeds, filters, penalties, stops, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from sugam import LLM, SamplingParams
from sugam.engine.sampler import _filter
from sugam.errors import PromptTooLongError
from sugam.sampling_params import InvalidRequestError

PROMPT = [5, 17, 42, 99, 7, 3]


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["qwen2"][0]), dtype="float32")


def tokens(llm, **kw):
    return llm.generate([PROMPT], SamplingParams(**kw))[0].outputs[0]


def test_same_seed_same_output_and_different_seeds_differ(llm):
    a = tokens(llm, temperature=1.5, seed=123, max_tokens=24, ignore_eos=True).token_ids
    b = tokens(llm, temperature=1.5, seed=123, max_tokens=24, ignore_eos=True).token_ids
    c = tokens(llm, temperature=1.5, seed=124, max_tokens=24, ignore_eos=True).token_ids
    assert a == b and a != c


def test_top_k_one_is_greedy(llm):
    greedy = tokens(llm, temperature=0, max_tokens=12, ignore_eos=True).token_ids
    assert tokens(llm, temperature=2.0, top_k=1, seed=5, max_tokens=12, ignore_eos=True).token_ids == greedy


def test_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(_filter(logits, 2, 1.0, 0.0)).tolist() == [False, False, True, True]
    assert torch.isinf(_filter(logits, 0, 0.7, 0.0)).tolist() == [False, False, True, True]
    assert torch.isinf(_filter(logits, 0, 0.5, 0.0)).tolist() == [False, True, True, True]
    assert torch.isinf(_filter(logits, 0, 1.0, 0.2)).tolist() == [False, False, False, True]


def test_penalties_change_the_output(llm):
    plain = tokens(llm, temperature=0, max_tokens=30, ignore_eos=True).token_ids
    penalised = tokens(llm, temperature=0, max_tokens=30, ignore_eos=True, frequency_penalty=2.0).token_ids
    repeat = tokens(llm, temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=3.0).token_ids
    assert len(set(plain)) < 30  # a random model repeats itself
    assert penalised != plain and repeat != plain
    assert len(set(repeat)) > len(set(plain))


def test_the_repetition_penalty_sees_every_distinct_token_as_the_sequence_grows_and_rolls_back(llm):
    """The sampler keeps a sequence's distinct tokens a step at a time; they must always be exactly
    set(prompt + output), also after output tokens are taken back (speculation, stop strings)."""
    from sugam.engine.sampler import SeenTokens

    engine = llm.engine
    seq = engine.add_request([5, 17, 42, 5], SamplingParams(temperature=0, repetition_penalty=1.3))

    def seen() -> set[int]:
        return set(SeenTokens.of(seq, torch.device("cpu")).tolist())

    assert seen() == {5, 17, 42}
    for token in (42, 99, 7, 99):
        seq.output_token_ids.append(token)
        assert seen() == set(seq.all_token_ids)
        assert len(SeenTokens.of(seq, torch.device("cpu"))) == len(set(seq.all_token_ids))  # no duplicates
    del seq.output_token_ids[1:]  # what OutputProcessor.rollback does, which also drops the state
    seq.seen_tokens = None
    seq.output_token_ids.append(8)
    assert seen() == {5, 17, 42, 8}
    engine.abort_request(seq.request_id)


def test_max_tokens_stop_ids_and_stop_strings(llm):
    out = tokens(llm, temperature=0, max_tokens=7, ignore_eos=True)
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    stop_id = out.token_ids[3]
    first = out.token_ids.index(stop_id)
    stopped = tokens(llm, temperature=0, max_tokens=7, ignore_eos=True, stop_token_ids=[stop_id])
    assert stopped.token_ids == out.token_ids[:first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_id

    text = tokens(llm, temperature=0, max_tokens=20, ignore_eos=True).text
    stop = text[5:9]  # a stop string that likely spans two tokens
    cut = tokens(llm, temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])
    assert cut.text == text[:text.index(stop)] and cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = tokens(llm, temperature=0, max_tokens=20, ignore_eos=True, stop=stop, include_stop_str_in_output=True)
    assert kept.text == text[:text.index(stop) + len(stop)]


def test_streaming_never_shows_a_stop_string(llm):
    text = tokens(llm, temperature=0, max_tokens=20, ignore_eos=True).text
    stop = text[6:10]
    deltas = list(llm.stream(PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])))
    assert "".join(deltas) == text[:text.index(stop)]
    full = list(llm.stream(PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)))
    assert "".join(full) == text


def test_logprobs(llm):
    out = tokens(llm, temperature=0, max_tokens=5, ignore_eos=True, logprobs=3)
    assert len(out.logprobs) == 5
    for token, entry in zip(out.token_ids, out.logprobs):
        assert entry[token].rank == 1  # greedy picks the most likely token
        assert len(entry) == 3
        assert sum(math.exp(lp.logprob) for lp in entry.values()) <= 1.0 + 1e-5


def test_bad_parameters_and_prompts_are_refused(llm):
    for bad, match in ((dict(temperature=-1), "temperature must be >= 0, got -1"),
                       (dict(top_p=0), r"top_p must be in \(0, 1\], got 0"),
                       (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
                       (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
                       (dict(logprobs=50), r"logprobs must be in \[0, 20\], got 50"),
                       (dict(min_p=2), r"min_p must be in \[0, 1\], got 2")):
        with pytest.raises(InvalidRequestError, match=match):
            SamplingParams(**bad)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]])
    with pytest.raises(InvalidRequestError, match="token ids"):
        llm.generate([[10**9]])
    with pytest.raises(PromptTooLongError, match="600 tokens.*512"):
        llm.generate([PROMPT, [5] * 600])  # the good prompt before it is withdrawn too
    assert not llm.engine.has_unfinished()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_closing_a_stream_frees_its_blocks(llm):
    stream = llm.stream(PROMPT, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    assert not llm.engine.has_unfinished()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
