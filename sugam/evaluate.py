"""Perplexity of a model over a text, in windows: a quality check users can run on a quantized model.

The text is tokenized once and cut into windows of `context` tokens that advance by `stride`; the
first window scores all its tokens after the first, later windows only the `stride` new ones (the
rest of each window is context), as the usual sliding-window evaluation does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .engine.batch import BatchEntry, ForwardBatch
from .engine.llm_engine import LLMEngine
from .errors import SugamError


@dataclass
class PerplexityResult:
    tokens_scored: int
    mean_nll: float
    windows: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def window_spans(num_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of each window; every token after the first is scored once."""
    spans, start, scored_until = [], 0, 1
    while True:
        end = min(start + context, num_tokens)
        spans.append((start, end, max(scored_until, 1)))
        if end == num_tokens:
            return spans
        scored_until, start = end, start + stride


@torch.inference_mode()
def perplexity(engine: LLMEngine, token_ids: list[int], context: int = 512, stride: int | None = None,
               progress: Callable[[int, int], None] | None = None, chunk: int | None = None) -> PerplexityResult:
    """Mean negative log-likelihood of `token_ids[1:]` given what precedes them (within a window).
    `chunk`: compute each window in chunks of this many tokens, each attending to the earlier ones
    through the KV cache, as a long prompt or a long answer does (None: the whole window at once, which
    attends to the fresh keys and values and so never reads the cache's format)."""
    stride = stride or context // 2
    if context < 2 or not 0 < stride <= context:
        raise SugamError(f"need context >= 2 and 0 < stride <= context (got {context}, {stride})")
    if chunk is not None and chunk < 1:
        raise SugamError(f"chunk must be positive (got {chunk})")
    if context > engine.max_model_len:
        raise SugamError(f"context {context} exceeds the model's usable context of {engine.max_model_len}")
    if len(token_ids) < 2:
        raise SugamError("the text has fewer than two tokens")
    runner, bs = engine.runner, engine.block_manager.block_size
    blocks_needed = -(-context // bs)
    if engine.has_unfinished() or engine.block_manager.num_free_blocks < blocks_needed:
        raise SugamError("perplexity needs an idle engine with room for one window")
    # Borrow blocks straight from the pool for one window at a time.
    table = engine.block_manager.take_blocks(blocks_needed)
    try:
        total_nll, scored = 0.0, 0
        spans = window_spans(len(token_ids), context, stride)
        for i, (start, end, first_scored) in enumerate(spans):
            window = token_ids[start:end]
            n = len(window)
            step = chunk or n
            hidden = torch.cat([runner.forward(ForwardBatch.build([BatchEntry(window[s:s + step], s, table, 0)], bs,
                                                                  runner.device))
                                for s in range(0, n, step)])
            # Rows whose next token is scored: positions first_scored-1 .. n-2 of the window.
            rows = torch.arange(first_scored - start - 1, n - 1, device=runner.device)
            targets = torch.tensor(window, device=runner.device)[rows + 1]
            for chunk in range(0, len(rows), 128):  # bound the logits buffer
                r = rows[chunk:chunk + 128]
                logprobs = runner.compute_logits(hidden[r]).log_softmax(-1)
                total_nll -= float(logprobs.gather(1, targets[chunk:chunk + 128, None]).sum())
            scored += len(rows)
            if progress:
                progress(i + 1, len(spans))
    finally:
        engine.block_manager.release_blocks(table)
    return PerplexityResult(tokens_scored=scored, mean_nll=total_nll / scored, windows=len(spans))
