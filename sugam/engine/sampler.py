"""Turns logits into tokens: penalties, temperature, top-k, top-p, min-p, seeded sampling, logprobs."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..tokenizer import Tokenizer
from .output_processor import OutputProcessor
from .sequence import Logprob, Sequence


@dataclass
class SeenTokens:
    """The distinct token ids of a sequence so far, kept up to date a token at a time: rebuilding them
    from its prompt and output each step cost ~1 ms a token at a few thousand tokens of context."""
    counted: int           # tokens of seq.all_token_ids already in `ids`
    distinct: set[int]
    ids: torch.Tensor      # long, the members of `distinct`

    @classmethod
    def of(cls, seq: Sequence, device: torch.device) -> torch.Tensor:
        state = seq.seen_tokens
        total = seq.num_tokens
        if state is None or state.counted > total or state.ids.device != device:
            distinct = set(seq.all_token_ids)
            state = seq.seen_tokens = cls(total, distinct, torch.tensor(sorted(distinct), dtype=torch.long,
                                                                         device=device))
        elif state.counted < total:
            new = seq.all_token_ids[state.counted:] if state.counted < len(seq.prompt_token_ids) \
                else seq.output_token_ids[state.counted - len(seq.prompt_token_ids):]
            fresh = set(new) - state.distinct
            if fresh:
                state.distinct |= fresh
                state.ids = torch.cat([state.ids, torch.tensor(sorted(fresh), dtype=torch.long, device=device)])
            state.counted = total
        return state.ids


def _apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    penalty = p.repetition_penalty
    if penalty is not None and penalty != 1.0:
        seen = SeenTokens.of(seq, logits.device)
        values = logits[seen]
        logits[seen] = _finite(torch.where(values > 0, values / penalty, values * penalty))
    if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
        out = torch.tensor(seq.output_token_ids, device=logits.device, dtype=torch.long)
        counts = torch.zeros_like(logits).index_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        logits = _finite(logits)
    return logits


def _finite(values: torch.Tensor) -> torch.Tensor:
    """Extreme penalties can overflow: keep every logit a number so that softmax stays defined."""
    return torch.nan_to_num(values, nan=float("-inf"), posinf=torch.finfo(values.dtype).max)


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already cover top_p (the first one always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


@dataclass
class Target:
    """What the sampler would draw from: one token (greedy, forced) or probabilities over `ids`
    (a top-k subset of the vocabulary) or over the whole vocabulary when `ids` is None."""
    token: int | None = None
    probs: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    vocab_size: int = 0

    def full_probs(self) -> torch.Tensor:
        """Probabilities over the whole vocabulary (normalised)."""
        assert self.probs is not None
        probs = self.probs / self.probs.sum()
        if self.ids is None:
            return probs
        return torch.zeros(self.vocab_size, dtype=probs.dtype).scatter_(0, self.ids, probs)


class Sampler:
    def __init__(self, tokenizer: Tokenizer, outputs: OutputProcessor):
        self.tokenizer = tokenizer
        self.outputs = outputs  # knows which token is forced and whether the grammar constrains

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int, dict[int, Logprob] | None]]:
        """logits: [len(seqs), vocab] float32. Returns (token, logprobs or None) per sequence."""
        return [self.sample(row, seq) for row, seq in zip(logits, seqs)]

    def sample(self, raw: torch.Tensor, seq: Sequence) -> tuple[int, dict[int, Logprob] | None]:
        """A token for `seq` from one row of logits, and its logprobs if asked for."""
        target = self.target(raw, seq)
        if target.token is not None:
            token = target.token
        else:
            assert target.probs is not None  # a Target holds one token or the probabilities
            choice = int(torch.multinomial(target.probs, 1, generator=seq.generator))
            token = int(target.ids[choice]) if target.ids is not None else choice
        return token, self.logprobs(raw, token, seq)

    def target(self, raw: torch.Tensor, seq: Sequence) -> Target:
        """The distribution the next token of `seq` is drawn from: penalties, the grammar's mask,
        temperature, top-k/top-p/min-p applied to the model's row; a single token when greedy or forced."""
        p = seq.params
        forced = self.outputs.forced_token(seq)
        if forced is not None:
            return Target(token=forced)
        row = raw
        constrained = self.outputs.constrained(seq)
        penalized = p.repetition_penalty != 1.0 or bool((p.presence_penalty or p.frequency_penalty)
                                                         and seq.output_token_ids)
        if penalized or constrained:  # else the row is used as it is (no 152k-entry passes)
            row = _apply_penalties(row.clone(), seq)
            if constrained:
                seq.grammar.mask_logits(row)  # type: ignore[union-attr]
            if not math.isfinite(float(row.max())):
                row = _finite(row)  # NaN from the model
            if not math.isfinite(float(row.max())):
                row = raw  # nothing left to choose from: fall back to the model's own choice
                p = replace(p, temperature=0.0)
        if p.greedy:
            return Target(token=int(torch.argmax(row)))
        # LLMEngine.create_sequence gave every sequence params.with_defaults(): none of these is None
        assert p.temperature is not None and p.top_k is not None and p.top_p is not None and p.min_p is not None
        ids = None
        if 0 < p.top_k < row.shape[-1]:
            # Only the top k can be drawn: filter and sample among them (a full-vocabulary
            # sort for top-p cost ~2.5 ms a token on 152k entries).
            row, ids = torch.topk(row, p.top_k)
        row = _filter(row / p.temperature, 0, p.top_p, p.min_p)
        probs = torch.nan_to_num(row.softmax(-1), nan=0.0)
        if float(probs.sum()) <= 0:  # every weight underflowed: take the most likely token
            probs = (row == row.max()).float()
        return Target(probs=probs, ids=ids, vocab_size=raw.shape[-1])

    def logprobs(self, raw: torch.Tensor, token: int, seq: Sequence) -> dict[int, Logprob] | None:
        top_n = seq.params.logprobs
        return None if top_n is None else self._logprobs(raw, token, top_n)

    def _logprobs(self, raw: torch.Tensor, token: int, top_n: int) -> dict[int, Logprob]:
        """Log-probabilities of the model's distribution (before sampling transforms)."""
        logprobs = raw.log_softmax(-1)
        chosen = float(logprobs[token])
        rank = int((logprobs > chosen).sum()) + 1
        out = {token: Logprob(chosen, rank, self.tokenizer.decode([token], skip_special_tokens=False))}
        if top_n:
            values, ids = torch.topk(logprobs, top_n)
            for r, (v, i) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
                out.setdefault(i, Logprob(v, r, self.tokenizer.decode([i], skip_special_tokens=False)))
        return out
