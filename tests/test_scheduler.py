"""The engine's contracts without a model: scheduler (admission, chunking, preemption, rollback),
block manager (truncate, salted prefix cache), forward batches and the output processor's rollback."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import train_tokenizer

from sugam import SamplingParams
from sugam.engine.batch import BatchEntry, ForwardBatch
from sugam.engine.block_manager import BlockManager
from sugam.engine.output_processor import OutputProcessor
from sugam.engine.scheduler import Scheduler
from sugam.engine.sequence import Sequence, SequenceStatus
from sugam.loader.base import TokenizerSpec
from sugam.tokenizer import Tokenizer

BS = 4  # tokens per block


@pytest.fixture(scope="module")
def outputs() -> OutputProcessor:
    tok = Tokenizer(TokenizerSpec(tokenizer_json=train_tokenizer().to_str()))
    think = (tok.token_to_id("<think>"), tok.token_to_id("</think>"))
    return OutputProcessor(tok, eos_token_ids=[0], think_token_ids=think)


@pytest.fixture
def make(outputs):
    counter = iter(range(10_000))

    def make_seq(prompt_len: int, salt: int | None = None, prompt: list[int] | None = None,
                 **params) -> Sequence:
        ids = prompt if prompt is not None else [10 + i % 200 for i in range(prompt_len)]
        p = SamplingParams(**{"max_tokens": 100, "ignore_eos": True, **params})
        return Sequence(str(next(counter)), None, ids, p, 10_000, torch.Generator(), outputs.text_state(ids, p),
                        cache_salt=salt)
    return make_seq


def run_step(sched: Scheduler, outputs: OutputProcessor, token: int = 50) -> dict[str, int]:
    """One step without a model: every sampling sequence 'samples' `token`. {request: tokens computed}"""
    out = sched.schedule()
    for s in out.scheduled:
        if s.samples:
            outputs.append(s.seq, token, None)
    sched.update(out)
    return {s.seq.request_id: s.num_new_tokens for s in out.scheduled}


def test_admission_is_fifo_and_bounded_by_slots_and_budget(make, outputs):
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=2, max_num_batched_tokens=100)
    a, b, c = make(10), make(10), make(10)
    for s in (a, b, c):
        sched.add(s)
    assert run_step(sched, outputs) == {a.request_id: 10, b.request_id: 10}  # two slots
    assert c.status == SequenceStatus.WAITING
    assert run_step(sched, outputs) == {a.request_id: 1, b.request_id: 1}
    assert sched.counts().num_waiting == 1 and sched.counts().num_running == 2


def test_long_prompts_are_chunked_and_share_steps_with_decodes(make, outputs):
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=8, max_num_batched_tokens=16)
    short, long = make(5), make(0, prompt=list(range(100, 140)))  # nothing shared
    sched.add(short)
    assert run_step(sched, outputs) == {short.request_id: 5}
    sched.add(long)
    # Each step: the running decode first, then as much of the long prompt as the budget leaves.
    assert run_step(sched, outputs) == {short.request_id: 1, long.request_id: 15}
    assert run_step(sched, outputs) == {short.request_id: 1, long.request_id: 15}
    assert run_step(sched, outputs) == {short.request_id: 1, long.request_id: 10}
    assert long.output_token_ids == [50]  # sampled once, after its last chunk
    assert run_step(sched, outputs) == {short.request_id: 1, long.request_id: 1}


def test_preemption_frees_the_newest_and_it_comes_back_first(make, outputs):
    bm = BlockManager(6, BS)  # 24 tokens
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    old, new = make(8), make(0, prompt=list(range(100, 108)))
    sched.add(old)
    sched.add(new)
    run_step(sched, outputs)  # 2 + 2 blocks, one token sampled each: 9 tokens each
    for _ in range(4):  # positions 8..11 fill the third block of each
        run_step(sched, outputs)
    assert bm.num_free_blocks == 0
    computed = run_step(sched, outputs)  # old needs a 4th block: new is preempted for it
    assert computed == {old.request_id: 1}
    assert new.status == SequenceStatus.WAITING and new.block_table == [] and new.num_computed_tokens == 0
    assert sched.waiting[0] is new and sched.num_preemptions == 1
    sched.abort(old.request_id)
    hits = bm.stats.hit_tokens
    assert list(run_step(sched, outputs)) == [new.request_id]  # recomputed: prompt + output so far,
    # Its first two blocks come from the prefix cache; the third (released first) went to `old`.
    assert bm.stats.hit_tokens - hits == 8
    assert new.status == SequenceStatus.RUNNING and new.num_computed_tokens == new.num_tokens - 1


def test_update_rolls_back_rejected_tokens_and_their_blocks(make, outputs):
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    seq = make(6)
    sched.add(seq)
    run_step(sched, outputs)
    assert seq.num_computed_tokens == 6 and len(seq.block_table) == 2
    # A speculative step: the newest token plus 5 guesses (rows 7..12), of which 1 + 2 are kept.
    out = sched.schedule()
    entry = out.scheduled[0]
    entry.draft_token_ids = [60, 61, 62, 63, 64]
    bm.grow(seq, entry.start + entry.num_tokens)
    assert entry.num_logits == 6 and len(seq.block_table) == 3
    free_before = bm.num_free_blocks
    sched.update(out, num_kept=[3])
    assert seq.num_computed_tokens == 9
    assert len(seq.block_table) == 3 and bm.num_free_blocks == free_before  # 9 tokens still need 3 blocks
    with pytest.raises(ValueError, match="cannot keep 7 of"):
        sched.update(out, num_kept=[7])


def test_truncate_returns_blocks_and_never_writes_into_a_shared_one(make, outputs):
    bm = BlockManager(16, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    prompt = list(range(20, 33))  # 13 tokens: 3 full blocks + 1
    first = make(0, prompt=prompt)
    sched.add(first)
    run_step(sched, outputs)
    second = make(0, prompt=prompt + [99])
    sched.add(second)
    run_step(sched, outputs)
    assert second.block_table[:3] == first.block_table[:3]  # shared through the prefix cache
    free = bm.num_free_blocks
    # Cut the second inside its (shared) second block: it lets go of it, and of the ones after.
    bm.truncate(second, 6)
    assert second.num_computed_tokens == 4 and len(second.block_table) == 1
    assert bm.blocks[first.block_table[1]].ref_count == 1
    assert bm.num_free_blocks == free + 1  # its own 4th block came back; shared ones stay with `first`
    # Cut the first inside a block only it holds: it keeps the block, which leaves the prefix cache.
    block = first.block_table[2]
    bm.truncate(first, 10)
    assert first.num_computed_tokens == 10 and first.block_table[2] == block
    assert bm.blocks[block].hash is None and len(first.block_hashes) == 2


def test_cache_salt_keeps_prefixes_apart(make, outputs):
    bm = BlockManager(32, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    prompt = list(range(40, 57))
    base = make(0, prompt=prompt)
    sched.add(base)
    run_step(sched, outputs)
    assert len(bm.lookup_prefix(make(0, prompt=prompt))) == 4
    assert bm.lookup_prefix(make(0, prompt=prompt, salt=1)) == []  # another adapter: no sharing
    salted = make(0, prompt=prompt, salt=1)
    sched.add(salted)
    run_step(sched, outputs)
    assert not set(salted.block_table) & set(base.block_table)
    assert len(bm.lookup_prefix(make(0, prompt=prompt, salt=1))) == 4  # its own prefix is cached


def test_door_takes_requests_and_aborts_from_other_threads(make, outputs):
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    seqs = [make(5) for _ in range(8)]
    threads = [threading.Thread(target=sched.submit, args=(s,)) for s in seqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sched.counts().num_waiting == 8 and sched.has_unfinished()
    sched.request_abort(seqs[0].request_id)
    assert len(run_step(sched, outputs)) == 7
    assert seqs[0].finish_reason == "abort"
    sched.request_abort(seqs[1].request_id)  # running now: its blocks come back at the next step
    run_step(sched, outputs)
    assert seqs[1].block_table == [] and sched.counts().num_running == 6


def test_forward_batch_rows_positions_slots_and_logits(make):
    entries = [BatchEntry([1, 2, 3], 0, [7], 1), BatchEntry([4], 5, [2, 9], 1),
               BatchEntry([5, 6, 7], 2, [3, 8], 3), BatchEntry([8, 9], 0, [1], 0)]
    batch = ForwardBatch.build(entries, BS, torch.device("cpu"))
    assert batch.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert batch.positions.tolist() == [0, 1, 2, 5, 2, 3, 4, 0, 1]
    assert batch.attention.slot_mapping.tolist() == [28, 29, 30, 37, 14, 15, 32, 4, 5]
    assert batch.logits_indices.tolist() == [2, 3, 4, 5, 6]  # several rows for the third
    assert batch.num_logits == [1, 1, 3, 0]


def test_output_rollback_restores_text_stops_and_length(make, outputs):
    tok = outputs.tokenizer
    words = tok.encode(" quick brown fox jumps over")
    # Greedy run A: all tokens; run B: two wrong guesses appended then rolled back, then the right ones.
    a = make(3, max_tokens=len(words), stop=["jumps"])
    for t in words:
        if not a.finished:
            outputs.append(a, t, None)
    b = make(3, max_tokens=len(words), stop=["jumps"])
    wrong = tok.encode(" lazy dog")
    outputs.append(b, words[0], None)
    for t in wrong:
        outputs.append(b, t, None)
    outputs.rollback(b, len(wrong))
    assert b.output_token_ids == words[:1] and not b.finished
    for t in words[1:]:
        if not b.finished:
            outputs.append(b, t, None)
    assert (b.output_token_ids, b.finish_reason, b.stop_reason) == (a.output_token_ids, "stop", "jumps")
    # A finish caused by a token is undone with it.
    last = b.output_token_ids[-1]
    outputs.rollback(b, 1)
    assert not b.finished and b.finish_reason is None
    outputs.append(b, last, None)
    assert outputs.output(b).outputs[0].text == outputs.output(a).outputs[0].text
    with pytest.raises(ValueError, match="not yet handed out"):  # it was handed out just now
        outputs.rollback(b, 1)


def test_output_rollback_restores_thinking_and_the_grammar(make, outputs):
    from sugam.engine.structured import GrammarCompiler

    tok = outputs.tokenizer
    start, end = outputs.think_token_ids
    seq = make(2, max_thinking_tokens=3)
    outputs.append(seq, start, None)
    outputs.append(seq, 60, None)
    assert seq.thinking and seq.text_state.thinking_tokens == 1
    outputs.append(seq, end, None)
    assert not seq.thinking
    outputs.rollback(seq, 2)
    assert seq.thinking and seq.text_state.thinking_tokens == 0

    compiler = GrammarCompiler(tok, tok.vocab_size, [0])
    seq = make(2)
    seq.grammar = compiler.matcher(regex="(ab)+c")
    ab = tok.encode("ab")
    for t in ab:
        outputs.append(seq, t, None)
    mask_after_ab = torch.zeros(tok.vocab_size)
    seq.grammar.mask_logits(mask_after_ab)
    for t in ab:
        outputs.append(seq, t, None)
    outputs.rollback(seq, len(ab))
    again = torch.zeros(tok.vocab_size)
    seq.grammar.mask_logits(again)
    assert torch.equal(again, mask_after_ab)
