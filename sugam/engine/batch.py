"""What one forward pass computes, as tensors: the contract between the scheduler and the runner.

A `ForwardBatch` is the flattened tokens of many sequences (prompt chunks, decode tokens and,
later, speculative guesses alike) with their positions, KV-cache slots and block tables, plus
the rows whose logits the caller wants (any number per sequence). The scheduler's output becomes
one; `evaluate.perplexity` builds one for each window of a text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..layers.attention import AttentionMetadata
from ..layers.lora import LoRAGroup
from .scheduler import SchedulerOutput

if TYPE_CHECKING:
    from .lora_manager import LoadedLoRA


@dataclass
class BatchEntry:
    """One sequence's rows: `token_ids` at positions `start`, `start + 1`, ...; logits wanted for
    its last `num_logits` rows. `rows_as_decodes`: each row attends as a decode step of its own
    (speculative verification rows: the same kernels, so the same logits, as plain decoding)."""
    token_ids: list[int]
    start: int
    block_table: list[int]
    num_logits: int
    rows_as_decodes: bool = False
    lora_slot: int | None = None     # the LoRA slot its rows use (None: the base model)
    lora_rank: int = 0               # that adapter's rank
    prompt: bool = True              # prompt (or recomputed) tokens, not a new output token and its guesses


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor            # [tokens] long
    positions: torch.Tensor            # [tokens] long
    attention: AttentionMetadata       # slots, per-sequence lengths and block tables
    logits_indices: torch.Tensor       # [rows wanted] long, in entry order
    num_logits: list[int]              # per entry: how many of logits_indices are its rows
    # LoRA: (slot, row indices, rank) per adapter of the step, rows None when one adapter has all rows.
    lora_groups: list[LoRAGroup] = field(default_factory=list)
    entries: list[BatchEntry] = field(default_factory=list)   # what it was built from

    def message(self) -> dict:
        """The batch as JSON-able data (tensor parallelism sends it to the other ranks)."""
        return {"entries": [dataclasses.asdict(e) for e in self.entries]}

    @classmethod
    def from_message(cls, message: dict, block_size: int, device: torch.device) -> ForwardBatch:
        return cls.build([BatchEntry(**e) for e in message["entries"]], block_size, device)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def build(cls, entries: Seq[BatchEntry], block_size: int, device: torch.device) -> ForwardBatch:
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        tables: list[torch.Tensor] = []
        logit_rows: list[int] = []
        lora_rows: dict[tuple[int, int], list[int]] = {}
        for entry in entries:
            if entry.lora_slot is not None:
                rows = lora_rows.setdefault((entry.lora_slot, entry.lora_rank), [])
                rows.extend(range(len(token_ids), len(token_ids) + len(entry.token_ids)))
            start, n, table = entry.start, len(entry.token_ids), entry.block_table
            token_ids.extend(entry.token_ids)
            for pos in range(start, start + n):
                positions.append(pos)
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            if entry.rows_as_decodes:
                for end in range(start + 1, start + n + 1):
                    query_lens.append(1)
                    context_lens.append(end)
                    tables.append(torch.tensor(table[:-(-end // block_size)], dtype=torch.long, device=device))
            else:
                query_lens.append(n)
                context_lens.append(start + n)
                tables.append(torch.tensor(table[:-(-(start + n) // block_size)], dtype=torch.long, device=device))
            logit_rows.extend(range(len(token_ids) - entry.num_logits, len(token_ids)))
        meta = AttentionMetadata.build(torch.tensor(slots, dtype=torch.long, device=device),
                                       query_lens, context_lens, tables)
        lora_groups = [(slot, None if len(rows) == len(token_ids) else torch.tensor(rows, dtype=torch.long, device=device),
                        rank) for (slot, rank), rows in lora_rows.items()]
        return cls(torch.tensor(token_ids, dtype=torch.long, device=device),
                   torch.tensor(positions, dtype=torch.long, device=device), meta,
                   torch.tensor(logit_rows, dtype=torch.long, device=device),
                   [e.num_logits for e in entries], lora_groups, list(entries))

    @classmethod
    def from_schedule(cls, output: SchedulerOutput, block_size: int, device: torch.device,
                      lora_slots: dict[LoadedLoRA, int] | None = None) -> ForwardBatch:
        """`lora_slots`: where each adapter of the step sits (LoRAManager.activate)."""
        return cls.build([BatchEntry(s.token_ids(), s.start, s.seq.block_table, s.num_logits,
                                     rows_as_decodes=bool(s.draft_token_ids) and s.num_new_tokens == 1,
                                     lora_slot=lora_slots[s.seq.lora] if lora_slots and s.seq.lora else None,
                                     lora_rank=s.seq.lora.adapter.max_rank if s.seq.lora else 0,
                                     prompt=not (s.num_new_tokens == 1 and s.seq.output_token_ids))
                          for s in output.scheduled], block_size, device)
