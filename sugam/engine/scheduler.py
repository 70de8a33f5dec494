"""Decides what each step computes: which sequences run, how many of their tokens, and which
sequence gives its KV blocks back when the pool runs out.

Policy: every running sequence first gets its next token (or its next prompt chunk), oldest first;
then waiting requests are admitted in arrival order (the queue head blocks the rest, so nobody is
overtaken) while the step has token budget, sequence slots and KV blocks. When a running sequence
cannot grow, the most recently admitted one is preempted: its blocks are freed and it is recomputed
later (prompt + output so far), so that older requests keep making progress.

The scheduler is driven by one thread (the engine's). Other threads talk to it only through
`submit` and `request_abort`, which queue the change for the next `schedule()`, and read it only
through `counts()`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)

# Batch invariance cuts prompts into chunks at multiples of this many tokens (at most the step's
# budget), and the prefix cache serves whole chunks: coarse enough that a long prompt takes few
# steps (its matmuls run in tiles of 64 rows anyway), fine enough to reuse most of a chat's history.
INVARIANT_CHUNK_TOKENS = 256


@dataclass
class ScheduledSequence:
    """One sequence's share of a step."""
    seq: Sequence
    start: int                 # first position computed this step (= seq.num_computed_tokens)
    num_new_tokens: int        # tokens of the sequence computed this step, from `start` on
    num_lookahead: int = 0     # room (KV slots, token budget) reserved for guesses after them
    # Guessed tokens computed after them to be verified (speculative decoding, at most
    # num_lookahead); their rows' logits are wanted too. Empty for plain decoding.
    draft_token_ids: list[int] = field(default_factory=list)
    draft_probs: list[Any] | None = None  # the guesser's distribution per guess (None: one-hot)

    # Whether this step reaches the sequence's newest token, so that it samples the next one
    # (fixed when scheduled: the tokens sampled afterwards do not change it).
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_new_tokens == self.seq.num_tokens

    @property
    def num_tokens(self) -> int:
        """Rows this sequence adds to the batch."""
        return self.num_new_tokens + len(self.draft_token_ids)

    @property
    def num_logits(self) -> int:
        """Rows of logits this sequence wants: its last token's and one per draft, if it samples."""
        return 1 + len(self.draft_token_ids) if self.samples else 0

    def token_ids(self) -> list[int]:
        return self.seq.all_token_ids[self.start:self.start + self.num_new_tokens] + self.draft_token_ids


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    preempted: list[Sequence]

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


@dataclass(frozen=True)
class SchedulerCounts:
    num_waiting: int   # including requests submitted but not yet seen by schedule()
    num_running: int
    running_loras: tuple[str, ...] = ()   # names of the LoRA adapters running / waiting requests use
    waiting_loras: tuple[str, ...] = ()


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_loras: int | None = None, batch_invariant: bool = False):
        """`max_loras`: the most LoRA adapters running requests may use at once (the model's slots).
        `batch_invariant`: a step holds prompt chunks or decode rows, never both (the two take different
        paths through the matmuls, engine/runner.py); with work of both kinds the steps alternate."""
        self.block_manager = block_manager
        self.batch_invariant = batch_invariant
        self._last_kind = "decode"
        # Batch invariance also fixes where a prompt is cut into chunks (and how much of it the prefix
        # cache may serve): at multiples of this many tokens, whatever shares the step, so that every
        # chunk's attention is the same call alone or in a batch.
        self.invariant_chunk = min(INVARIANT_CHUNK_TOKENS, max_num_batched_tokens)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_loras = max_loras
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # The door for other threads, and the counts they may read.
        self._lock = threading.Lock()
        self._submitted: list[Sequence] = []
        self._abort_requests: set[str] = set()
        self._counts = SchedulerCounts(0, 0)

    # ---- from any thread -------------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        """Queue a validated sequence; it joins the waiting queue at the next `schedule()`."""
        with self._lock:
            self._submitted.append(seq)
            names = self._counts.waiting_loras
            if seq.lora is not None and seq.lora.name not in names:
                names = tuple(sorted((*names, seq.lora.name)))
            self._counts = replace(self._counts, num_waiting=self._counts.num_waiting + 1, waiting_loras=names)

    def request_abort(self, request_id: str) -> None:
        """Abort a request at the next `schedule()` (it frees the request's blocks)."""
        with self._lock:
            self._abort_requests.add(request_id)

    def counts(self) -> SchedulerCounts:
        with self._lock:
            return self._counts

    def has_pending(self) -> bool:
        """Submitted requests or aborts not yet applied."""
        with self._lock:
            return bool(self._submitted or self._abort_requests)

    # ---- from the engine's thread ------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a sequence from the engine's own thread."""
        self.waiting.append(seq)
        self._publish_counts()

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running) or self.has_pending()

    def abort(self, request_id: str) -> Sequence | None:
        """Stop a request now and give its KV blocks back; the sequence, or None if not found."""
        self._apply_door()
        return self._abort_now(request_id)

    def _abort_now(self, request_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.block_manager.free(seq)
                    _mark_aborted(seq)
                    self._publish_counts()
                    return seq
        return None

    def schedule(self, lookahead: Callable[[Sequence], int] | None = None) -> SchedulerOutput:
        """`lookahead(seq)`: how many guessed tokens a decoding sequence would like verified after
        its newest one; room is reserved where the token budget and free blocks allow (a guess
        never preempts anybody)."""
        self._apply_door()
        if not self.batch_invariant:
            return self._schedule(lookahead, None)
        kinds = ("decode", "prompt") if self._last_kind == "prompt" else ("prompt", "decode")
        preempted: list[Sequence] = []
        for kind in kinds:
            output = self._schedule(lookahead, kind)
            preempted += output.preempted
            if output.scheduled:
                self._last_kind = kind
                break
        return replace(output, preempted=preempted)

    def _schedule(self, lookahead: Callable[[Sequence], int] | None, kind: str | None) -> SchedulerOutput:
        """One step's work; `kind` "prompt" or "decode" takes only that kind of sequence (None: both)."""
        bm, budget = self.block_manager, self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted below to make room for an older one
                continue
            if kind is not None and (kind == "decode") != _decodes(seq):
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if kind == "prompt":
                n = self._invariant_chunk(seq.num_computed_tokens, seq.num_tokens)
                if n > budget:
                    continue  # cut only at the fixed places: it waits for a step with room
            if n <= 0:
                continue
            while not bm.can_grow(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if seq.status != SequenceStatus.RUNNING:
                    break
            else:
                bm.grow(seq, seq.num_computed_tokens + n)
                extra = 0
                if lookahead is not None and n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens:
                    extra = min(lookahead(seq), budget - 1)
                    if extra > 0 and bm.can_grow(seq, seq.num_tokens + extra):
                        bm.grow(seq, seq.num_tokens + extra)
                    else:
                        extra = 0
                scheduled.append(ScheduledSequence(seq, seq.num_computed_tokens, n, extra))
                budget -= n + extra
        while kind != "decode" and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._lora_fits(seq):
                break  # its adapter would need a slot that running requests hold
            prefix = bm.lookup_prefix(seq)
            if kind == "prompt":  # the cache serves whole chunks only
                served = len(prefix) * bm.block_size // self.invariant_chunk * self.invariant_chunk
                prefix = prefix[:served // bm.block_size] if served % bm.block_size == 0 else []
            computed = max(seq.num_computed_tokens, len(prefix) * bm.block_size)
            n = min(seq.num_tokens - computed, budget)
            if kind == "prompt":
                n = self._invariant_chunk(computed, seq.num_tokens)
                if n > budget:
                    break
            if not bm.can_admit(seq, prefix, computed + n):
                break
            self.waiting.popleft()
            bm.take_prefix(seq, prefix)
            bm.grow(seq, seq.num_computed_tokens + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, seq.num_computed_tokens, n))
            budget -= n
        # A sequence preempted after it was scheduled in this step must not run in it.
        scheduled = [s for s in scheduled if s.seq.status == SequenceStatus.RUNNING]
        self._publish_counts()
        return SchedulerOutput(scheduled, preempted)

    def _invariant_chunk(self, computed: int, total: int) -> int:
        """Tokens of the next prompt chunk from `computed` on, up to the next fixed boundary."""
        return min(total - computed, self.invariant_chunk - computed % self.invariant_chunk)

    def update(self, output: SchedulerOutput, num_kept: list[int] | None = None) -> None:
        """After the step: each scheduled sequence keeps the K/V of its first `num_kept[i]` computed
        tokens (default: all of them; fewer when guesses were rejected, and the rest is rolled
        back), its full blocks enter the prefix cache, and finished sequences leave."""
        bm = self.block_manager
        for i, entry in enumerate(output.scheduled):
            seq = entry.seq
            kept = entry.num_tokens if num_kept is None else num_kept[i]
            if not 0 <= kept <= entry.num_tokens:
                raise ValueError(f"request {seq.request_id} cannot keep {kept} of {entry.num_tokens} tokens")
            seq.num_computed_tokens = entry.start + entry.num_tokens
            if kept < entry.num_tokens:
                bm.truncate(seq, entry.start + kept)
            bm.register_computed_blocks(seq)
            if seq.finished and seq in self.running:
                self.running.remove(seq)
                bm.free(seq)
        self._publish_counts()

    def _lora_fits(self, seq: Sequence) -> bool:
        if seq.lora is None or self.max_loras is None:
            return True
        running = {s.lora for s in self.running if s.lora is not None}
        return seq.lora in running or len(running) < self.max_loras

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it will be recomputed from its tokens later."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        log.debug("preempted request %s (%d tokens)", seq.request_id, seq.num_tokens)

    def _apply_door(self) -> None:
        with self._lock:
            submitted, self._submitted = self._submitted, []
            aborts, self._abort_requests = self._abort_requests, set()
        for seq in submitted:
            if seq.request_id in aborts:
                aborts.discard(seq.request_id)
                _mark_aborted(seq)
            else:
                self.waiting.append(seq)
        for request_id in aborts:
            self._abort_now(request_id)
        self._publish_counts()

    def _publish_counts(self) -> None:
        running = tuple(sorted({s.lora.name for s in self.running if s.lora is not None}))
        with self._lock:
            waiting = tuple(sorted({s.lora.name for s in (*self.waiting, *self._submitted) if s.lora is not None}))
            self._counts = SchedulerCounts(len(self.waiting) + len(self._submitted), len(self.running),
                                           running, waiting)


def _decodes(seq: Sequence) -> bool:
    """Whether the sequence's next step computes one new output token (not a prompt or a recompute)."""
    return seq.num_tokens - seq.num_computed_tokens == 1 and bool(seq.output_token_ids)


def _mark_aborted(seq: Sequence) -> None:
    seq.status, seq.finish_reason, seq.stop_reason = SequenceStatus.FINISHED, "abort", None
