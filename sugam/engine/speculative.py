"""Speculative decoding: guess a few tokens cheaply, verify them in one forward of the model.

On a CPU a decode step costs a full read of the weights, and the quantized kernels take several
rows for nearly the price of one; so every guess the model confirms is a token almost for free.

- Guesses (`Proposal`s) come from prompt lookup (`NgramProposer`: the tokens that followed the
  latest earlier occurrence of the last n tokens) or a small draft model with the same vocabulary
  (`DraftModelProposer`, with its own KV cache under the target's block tables).
- The scheduler reserves room for k guesses after a decoding sequence's newest token
  (`Speculator.lookahead`); the batch computes those k+1 rows as decode rows (the same kernels, so
  the same logits, as plain decoding).
- `Speculator.verify` accepts guess x with probability min(1, p(x)/q(x)), p being the distribution
  the sampler would draw from (penalties, grammar, temperature, top-k/p, min-p) and q the guesser's
  (one-hot for prompt lookup); on the first rejection it draws from norm(max(0, p - q)); after k
  acceptances it adds the model's own next token. Greedy requests accept exactly the tokens plain
  decoding would pick. Only verified tokens reach the output processor, so stop strings, EOS,
  `max_tokens`, the grammar and the thinking budget see the same tokens as without speculation;
  the K/V of rejected guesses is rolled back by `Scheduler.update(num_kept)`.
- A sequence whose guesses keep failing guesses fewer tokens, then none for a while.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import SugamError
from .batch import BatchEntry, ForwardBatch
from .scheduler import ScheduledSequence, SchedulerOutput
from .sequence import Sequence

if TYPE_CHECKING:
    from .output_processor import OutputProcessor
    from .runner import ModelRunner
    from .sampler import Sampler

MAX_SPECULATIVE_TOKENS = 16
# On a CPU a step's cost grows with its rows (the kernels are compute-bound per row on few cores:
# 6 rows cost ~2.3-2.7x one on the 2-core Zen 4, 8 concurrent decodes already ~3.4x), so a guess is
# only cheap while the step is small. Guesses are trimmed so that a step stays within this many
# rows: one stream guesses 5 tokens, two guess 2 each, eight none (measured: with 48 rows of
# guesses 8 concurrent code edits ran at 0.93x plain, compute-bound either way).
CPU_SPECULATIVE_STEP_ROWS = 6


@dataclass
class SpeculativeConfig:
    """vLLM's shape: {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4} or
    {"model": "ALIAS_OR_PATH", "num_speculative_tokens": 4}."""
    method: str                          # "ngram" or "draft_model"
    num_speculative_tokens: int
    model: str | None = None             # the draft model (alias, .gguf, folder)
    prompt_lookup_max: int = 4           # ngram: longest suffix looked up
    prompt_lookup_min: int = 2           # ngram: shortest (1 guesses after any repeated token: often wrong)
    # sugam's: rows a step may have with its guesses (None: CPU_SPECULATIVE_STEP_ROWS on a CPU, no cap elsewhere)
    max_step_rows: int | None = None

    def __post_init__(self) -> None:
        if self.method not in ("ngram", "draft_model"):
            raise SugamError(f"speculative method must be ngram or draft_model, not {self.method!r}")
        if self.method == "draft_model" and not self.model:
            raise SugamError("speculative decoding with a draft model needs its \"model\"")
        for name, value in (("num_speculative_tokens", self.num_speculative_tokens),
                            ("prompt_lookup_max", self.prompt_lookup_max),
                            ("prompt_lookup_min", self.prompt_lookup_min)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SPECULATIVE_TOKENS:
                raise SugamError(f"speculative {name} must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise SugamError("speculative prompt_lookup_min must not exceed prompt_lookup_max")
        if self.max_step_rows is not None and (isinstance(self.max_step_rows, bool) or not isinstance(self.max_step_rows, int)
                                               or self.max_step_rows < 2):
            raise SugamError(f"speculative max_step_rows must be an integer >= 2, got {self.max_step_rows!r}")

    @classmethod
    def parse(cls, spec: dict[str, Any] | str | None, num_speculative_tokens: int | None = None
              ) -> SpeculativeConfig | None:
        """From a dict, its JSON text, or the short form "ngram" / a model name (CLI --speculative)."""
        if spec is None or spec == "":
            return None
        if isinstance(spec, str):
            text = spec.strip()
            if text.startswith("{"):
                try:
                    spec = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise SugamError(f"--speculative-config is not valid JSON: {exc}") from None
            else:
                spec = {"method": "ngram"} if text == "ngram" else {"model": text}
        if not isinstance(spec, dict):
            raise SugamError("the speculative config must be a JSON object")
        known = {"method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "max_step_rows"}
        unknown = set(spec) - known
        if unknown:
            raise SugamError(f"unknown speculative option(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(known))}")
        method = spec.get("method") or ("draft_model" if spec.get("model") else "ngram")
        if method == "draft":
            method = "draft_model"
        k = num_speculative_tokens if num_speculative_tokens is not None else spec.get(
            "num_speculative_tokens", 5 if method == "ngram" else 4)
        lookup_max = spec.get("prompt_lookup_max", 4)
        return cls(method=method, num_speculative_tokens=k, model=spec.get("model"),
                   prompt_lookup_max=lookup_max,
                   prompt_lookup_min=spec.get("prompt_lookup_min", min(2, lookup_max)),
                   max_step_rows=spec.get("max_step_rows"))


@dataclass
class Proposal:
    tokens: list[int]
    # The guesser's distribution for each guess (full vocabulary); None: each guess is certain (one-hot).
    probs: list[torch.Tensor] | None = None


@dataclass
class SpeculationState:
    """Per sequence: how many tokens to guess next, and the back-off after failures."""
    k: int
    misses: int = 0
    cooldown: int = 0
    backoff: int = 0


@dataclass
class SpeculationStats:
    num_drafts: int = 0            # verification steps with at least one guess
    num_draft_tokens: int = 0      # guesses verified
    num_accepted_tokens: int = 0   # guesses the model confirmed
    num_emitted_tokens: int = 0    # tokens those steps produced (accepted + the model's own)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


class NgramProposer:
    """Prompt lookup: the last n tokens (n from max down to min) found earlier in the prompt or
    output propose the tokens that followed their latest occurrence."""

    def __init__(self, config: SpeculativeConfig):
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max

    def propose(self, requests: list[tuple[ScheduledSequence, int]]) -> list[Proposal]:
        return [Proposal(self.lookup(entry.seq.all_token_ids, k)) for entry, k in requests]

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        if len(tokens) < self.min_n + 1:
            return []
        ids = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # every earlier n-gram
            hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return ids[start:start + k].tolist()
        return []


class DraftModelProposer:
    """A small model with the same vocabulary guesses k tokens autoregressively. Its KV cache has
    as many blocks as the target's and is addressed through the same block tables, so the target's
    rollback (positions past the kept tokens are simply written again) applies to it too."""

    def __init__(self, runner: ModelRunner, block_size: int):
        self.runner, self.block_size = runner, block_size

    def propose(self, requests: list[tuple[ScheduledSequence, int]]) -> list[Proposal]:
        # A greedy sequence's guesses are certain (its verification never reads q): no distributions.
        proposals = [Proposal([], None if entry.seq.params.greedy else []) for entry, _ in requests]
        # Catch up: every token the draft has not seen yet (a whole prompt the first time), then
        # the first guess from the last row.
        entries = []
        for entry, _ in requests:
            seq = entry.seq
            start = min(seq.num_draft_computed_tokens, seq.num_tokens - 1)
            entries.append(BatchEntry(seq.all_token_ids[start:], start, seq.block_table, 1))
        live = list(range(len(requests)))
        for step in range(max(k for _, k in requests)):
            if step > 0:
                entries = [BatchEntry([proposals[i].tokens[-1]], requests[i][0].seq.num_tokens + step - 1,
                                      requests[i][0].seq.block_table, 1) for i in live]
            logits = self.runner.execute(ForwardBatch.build(entries, self.block_size, self.runner.device))
            assert logits is not None
            for row, i in zip(logits, live):
                token, probs = _draw(row, requests[i][0].seq)
                proposal = proposals[i]
                proposal.tokens.append(token)
                if proposal.probs is not None and probs is not None:
                    proposal.probs.append(probs)
            live = [i for i in live if len(proposals[i].tokens) < requests[i][1]]
            if not live:
                break
        for (entry, _), proposal in zip(requests, proposals):
            # K/V fed so far: the sequence's tokens and every guess but the last.
            entry.seq.num_draft_computed_tokens = entry.seq.num_tokens + len(proposal.tokens) - 1
        return proposals


def _fit(q: torch.Tensor, size: int) -> torch.Tensor:
    """The draft's distribution over the target's vocabulary (their embedding tables may be padded
    to different sizes; the tokens beyond the tokenizer's are never drawn)."""
    if q.shape[0] == size:
        return q
    return q[:size] if q.shape[0] > size else torch.nn.functional.pad(q, (0, size - q.shape[0]))


def _draw(row: torch.Tensor, seq: Sequence) -> tuple[int, torch.Tensor | None]:
    """A draft token and the distribution it was drawn from (any q keeps the result exact; the
    closer to the target's, the more is accepted); None when the token is certain (greedy)."""
    p = seq.params
    if p.greedy:
        return int(torch.argmax(row)), None
    assert p.temperature is not None  # the sequence's params went through with_defaults()
    probs = (row / p.temperature).softmax(-1)
    token = int(torch.multinomial(probs, 1, generator=seq.generator))
    return token, probs


class Speculator:
    """Decides how many guesses each sequence makes, asks the proposer, verifies, and adapts."""

    def __init__(self, config: SpeculativeConfig, proposer: NgramProposer | DraftModelProposer, max_model_len: int,
                 max_step_rows: int | None = None):
        """`max_step_rows`: guesses are trimmed so that a step has at most this many rows (None: no cap)."""
        self.config, self.proposer, self.max_model_len = config, proposer, max_model_len
        self.max_step_rows = max_step_rows
        self.stats = SpeculationStats()

    def lookahead(self, seq: Sequence) -> int:
        """Guesses to make room for after `seq`'s newest token this step."""
        state = seq.speculation
        if state is None:
            state = seq.speculation = SpeculationState(self.config.num_speculative_tokens)
        if state.cooldown > 0:
            state.cooldown -= 1
            return 0
        remaining = seq.max_output_tokens - len(seq.output_token_ids) - 1  # the last token is the model's own
        room = self.max_model_len - seq.num_tokens
        return max(0, min(state.k, remaining, room))

    def propose(self, output: SchedulerOutput) -> None:
        requests = [(s, s.num_lookahead) for s in output.scheduled if s.num_lookahead > 0]
        if requests and self.max_step_rows is not None:
            spare = self.max_step_rows - output.num_batched_tokens  # the rows the step has without guesses
            share, extra = divmod(max(0, spare), len(requests))
            requests = [(s, min(k, share + (i < extra))) for i, (s, k) in enumerate(requests)]
            requests = [(s, k) for s, k in requests if k > 0]
        if not requests:
            return
        for (entry, k), proposal in zip(requests, self.proposer.propose(requests)):
            entry.draft_token_ids = proposal.tokens[:k]
            entry.draft_probs = proposal.probs[:k] if proposal.probs is not None else None

    def verify(self, entry: ScheduledSequence, rows: torch.Tensor, sampler: Sampler,
               outputs: OutputProcessor) -> int:
        """Append the tokens the model confirms (and its own next one) to the sequence; return how
        many guesses were accepted. `rows` holds the logits after the newest token and after each guess."""
        seq, guesses = entry.seq, entry.draft_token_ids
        before = len(seq.output_token_ids)
        accepted = 0
        for i, guess in enumerate(guesses):
            target = sampler.target(rows[i], seq)
            if target.token is not None:  # greedy, or a token the engine forces
                token, ok = target.token, target.token == guess
            else:
                p = target.full_probs()
                q_row = None if entry.draft_probs is None else _fit(entry.draft_probs[i], p.shape[0])
                q = 1.0 if q_row is None else float(q_row[guess])
                ok = q > 0 and float(torch.rand(1, generator=seq.generator)) < min(1.0, float(p[guess]) / q)
                token = guess
                if not ok:
                    residual = p.clone()
                    if q_row is None:
                        residual[guess] = 0.0
                    else:
                        residual = (p - q_row).clamp_(min=0.0)
                    if float(residual.sum()) <= 0:
                        residual = p
                    token = int(torch.multinomial(residual, 1, generator=seq.generator))
            outputs.append(seq, token, sampler.logprobs(rows[i], token, seq))
            if not ok:
                break
            accepted += 1
            if seq.finished:
                break
        else:
            if not seq.finished:  # every guess confirmed: the model's own next token comes free
                token, logprobs = sampler.sample(rows[len(guesses)], seq)
                outputs.append(seq, token, logprobs)
        self._adapt(seq, len(guesses), accepted, len(seq.output_token_ids) - before)
        return accepted

    def _adapt(self, seq: Sequence, guessed: int, accepted: int, emitted: int) -> None:
        s, state = self.stats, seq.speculation
        s.num_drafts += 1
        s.num_draft_tokens += guessed
        s.num_accepted_tokens += accepted
        s.num_emitted_tokens += emitted
        if state is None:
            return
        if accepted == guessed:
            state.misses, state.backoff = 0, max(0, state.backoff - 1)
            state.k = min(self.config.num_speculative_tokens, state.k + 1)
        elif accepted == 0:
            state.k = max(1, state.k // 2)
            state.misses += 1
            if state.misses >= 2:  # guesses keep failing: stop guessing for a while (longer each time)
                state.cooldown, state.misses = min(64, 4 << state.backoff), 0
                state.backoff = min(state.backoff + 1, 4)
        else:
            state.misses = 0
            state.k = max(1, min(self.config.num_speculative_tokens, accepted + 1))

