"""Turns sampled tokens into a request's output: detokenization, stop tokens and strings, the
thinking budget, the grammar, `max_tokens`; and takes the last k tokens back.

The engine appends tokens here after sampling; `rollback` undoes the newest ones exactly (text,
reasoning state, grammar, logprobs, a finish they caused), which speculative decoding needs when a
guessed token is rejected. Text that a caller has already been given cannot be taken back.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..sampling_params import SamplingParams
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .sequence import CompletionOutput, Logprob, RequestOutput, Sequence, SequenceStatus, TextState

# How many of the newest tokens a sequence can roll back (a speculative step keeps at most k+1).
ROLLBACK_WINDOW = 64


@dataclass
class Checkpoint:
    """A sequence's output state just before one token was appended."""
    detokenizer: tuple[int, int, int]
    text: str
    thinking: bool
    thinking_tokens: int
    grammar_advanced: bool
    status: SequenceStatus
    finish_reason: str | None
    stop_reason: str | int | None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: list[int], think_token_ids: tuple[int, int] | None):
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.think_token_ids = think_token_ids

    def text_state(self, prompt_token_ids: list[int], params: SamplingParams) -> TextState:
        """The initial text state of a request (a chat template may already have opened <think>)."""
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        state = TextState(
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens),
            stop_ids=frozenset(stop_ids), think_ids=self.think_token_ids,
            holdback=max((len(s) for s in params.stop or []), default=1) - 1,
            checkpoints=deque(maxlen=ROLLBACK_WINDOW))
        if self.think_token_ids:
            for token in reversed(prompt_token_ids):
                if token in self.think_token_ids:
                    state.thinking = token == self.think_token_ids[0]
                    break
        return state

    # ---- what the sampler asks ---------------------------------------------------------------------

    @staticmethod
    def forced_token(seq: Sequence) -> int | None:
        """A token the engine writes instead of sampling: </think> once the thinking budget is spent."""
        state, budget = seq.text_state, seq.params.max_thinking_tokens
        if state.thinking and budget is not None and state.thinking_tokens >= budget and state.think_ids:
            return state.think_ids[1]
        return None

    @staticmethod
    def constrained(seq: Sequence) -> bool:
        """Whether the grammar decides which tokens may come next. A JSON schema shapes the answer,
        so a reasoning model thinks freely first; a regex shapes the whole output."""
        if seq.grammar is None:
            return False
        return not (seq.text_state.thinking and seq.params.json_schema is not None)

    # ---- appending and taking back -----------------------------------------------------------------

    def append(self, seq: Sequence, token_id: int, logprobs: dict[int, Logprob] | None) -> None:
        """Record a sampled token and decide whether the sequence is done."""
        state = seq.text_state
        grammar_step = self.constrained(seq)
        state.checkpoints.append(Checkpoint(state.detokenizer.snapshot(), state.text, state.thinking,
                                       state.thinking_tokens, False, seq.status, seq.finish_reason,
                                       seq.stop_reason))
        if state.think_ids and token_id == state.think_ids[0]:
            state.thinking, state.thinking_tokens = True, 0
        elif state.think_ids and token_id == state.think_ids[1]:
            state.thinking = False
        elif state.thinking:
            state.thinking_tokens += 1
        seq.output_token_ids.append(token_id)
        state.new_token_ids.append(token_id)
        if seq.logprobs is not None and logprobs is not None:
            seq.logprobs.append(logprobs)
        if token_id in state.stop_ids:
            state.text += state.detokenizer.flush()
            self._finish(seq, "stop", token_id)
            return
        state.text += state.detokenizer.push(token_id)
        if seq.params.stop and self._match_stop_string(seq):
            return
        if grammar_step and seq.grammar is not None:
            seq.grammar.accept(token_id)
            state.checkpoints[-1].grammar_advanced = True
            if seq.grammar.done:  # the document is complete: only end-of-sequence could follow
                state.text += state.detokenizer.flush()
                self._finish(seq, "stop", None)
                return
        if len(seq.output_token_ids) >= seq.max_output_tokens:
            state.text += state.detokenizer.flush()
            self._finish(seq, "length", None)

    def rollback(self, seq: Sequence, count: int) -> None:
        """Take back the `count` newest tokens, as if they had never been appended."""
        state = seq.text_state
        if count > len(state.checkpoints) or count > len(state.new_token_ids):
            raise ValueError(f"cannot roll back {count} tokens of request {seq.request_id}: only tokens "
                             f"not yet handed out, at most {ROLLBACK_WINDOW}, can be taken back")
        if count == 0:
            return
        oldest = state.checkpoints[-count]
        if len(oldest.text) < state.emitted:
            raise ValueError(f"cannot roll back text of request {seq.request_id} that was already streamed")
        taken = [state.checkpoints.pop() for _ in range(count)]
        if seq.grammar is not None:
            advanced = sum(c.grammar_advanced for c in taken)
            if advanced:
                seq.grammar.rollback(advanced)
        state.detokenizer.restore(oldest.detokenizer)
        state.text, state.thinking, state.thinking_tokens = oldest.text, oldest.thinking, oldest.thinking_tokens
        seq.status, seq.finish_reason, seq.stop_reason = oldest.status, oldest.finish_reason, oldest.stop_reason
        kept = len(seq.output_token_ids) - count
        del seq.output_token_ids[kept:]
        seq.seen_tokens = None
        del state.new_token_ids[len(state.new_token_ids) - count:]
        if seq.logprobs is not None:
            del seq.logprobs[kept:]

    def _match_stop_string(self, seq: Sequence) -> bool:
        # Only the tail can hold a new match: the text before it was checked on earlier tokens.
        state = seq.text_state
        start = max(0, state.emitted - state.holdback)
        best = None
        for stop in seq.params.stop or []:
            at = state.text.find(stop, start)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return False
        at, stop = best
        state.text = state.text[:at + len(stop)] if seq.params.include_stop_str_in_output else state.text[:at]
        self._finish(seq, "stop", stop)
        return True

    @staticmethod
    def _finish(seq: Sequence, reason: str, stop_reason: str | int | None) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    # ---- what callers see ----------------------------------------------------------------------------

    def output(self, seq: Sequence) -> RequestOutput:
        """The cumulative output plus what changed since the last call."""
        state = seq.text_state
        # While running, hold back text that may turn out to be the start of a stop string.
        visible = len(state.text) if seq.finished else max(state.emitted, len(state.text) - state.holdback)
        delta = state.text[state.emitted:visible]
        state.emitted = visible
        new_ids, state.new_token_ids = state.new_token_ids, []
        completion = CompletionOutput(
            index=0, text=state.text[:visible], token_ids=list(seq.output_token_ids),
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            logprobs=seq.logprobs, delta_text=delta, delta_token_ids=new_ids)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion], seq.finished)

