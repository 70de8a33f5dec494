"""Attention over a paged KV cache.

The cache of one layer is two tensors [num_blocks, block_size, kv_heads, head_dim]. A step's
tokens (prefill chunks and decode tokens of many sequences, flattened) are written at their
slots, then each sequence attends to its own context, gathered through its block table.

Measured on the 2-core CPU (benchmarks/attention.py, 0.5B shapes, bf16, contexts 128-640):
per-sequence gather + SDPA with the query heads of each KV head folded into the query-length
axis takes 92 / 710 / 2,730 µs a layer for 1 / 8 / 32 decoding sequences; SDPA's own
`enable_gqa` takes 3-4x longer (358 / 2,700 / 9,300 µs), one padded batched gather + masked SDPA
is slower still at 8 and 32 (padding and the mask push SDPA onto its slow path), and compiled
flex_attention is no faster than the loop. Prefill is compute-bound: `enable_gqa` with a causal
or chunk mask is as fast as repeating K/V, so it is used there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Describes one flattened batch of tokens; built once per step and shared by all layers."""
    slot_mapping: torch.Tensor          # [tokens] long: cache slot (block * block_size + offset) of each token
    query_starts: list[int]             # first token of each sequence in the flattened batch
    query_lens: list[int]               # tokens each sequence brings this step
    context_lens: list[int]             # tokens of each sequence in the cache after this step
    block_tables: list[torch.Tensor]    # per sequence: long tensor of block ids covering context_lens
    causal_masks: list[torch.Tensor | None]  # per sequence: bool mask when a chunk follows cached tokens

    @classmethod
    def build(cls, slot_mapping: torch.Tensor, query_lens: list[int], context_lens: list[int],
              block_tables: list[torch.Tensor]) -> "AttentionMetadata":
        starts, masks, offset = [], [], 0
        device = slot_mapping.device
        for q_len, ctx_len in zip(query_lens, context_lens):
            starts.append(offset)
            offset += q_len
            if q_len == 1 or q_len == ctx_len:
                masks.append(None)  # decode: sees everything; fresh prefill: plain causal
            else:
                query_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)
                masks.append(torch.arange(ctx_len, device=device)[None, :] <= query_pos[:, None])
        return cls(slot_mapping, starts, query_lens, context_lens, block_tables, masks)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]. Returns [tokens, heads, dim]."""
    kv_heads, head_dim = k.shape[1], k.shape[2]
    flat_k = k_cache.view(-1, kv_heads, head_dim)
    flat_v = v_cache.view(-1, kv_heads, head_dim)
    flat_k.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    flat_v.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

    out = torch.empty_like(q)
    for start, q_len, ctx_len, table, mask in zip(meta.query_starts, meta.query_lens, meta.context_lens,
                                                  meta.block_tables, meta.causal_masks):
        end = start + q_len
        if q_len == ctx_len:  # nothing cached before this chunk: use the fresh keys directly
            keys, values = k[start:end], v[start:end]
        else:
            keys = k_cache[table].view(-1, kv_heads, head_dim)[:ctx_len]
            values = v_cache[table].view(-1, kv_heads, head_dim)[:ctx_len]
        if q_len == 1:
            # Decode: the query heads sharing a KV head become rows of one query (exact, 3-4x faster
            # than enable_gqa on CPU), as three plain ops: SDPA's math path for this shape costs
            # ~65 µs a layer in dispatch alone.
            grouped = q[start].view(kv_heads, -1, head_dim)
            scores = torch.matmul(grouped, keys.to(q.dtype).permute(1, 2, 0)).float().mul_(scale)
            probs = torch.softmax(scores, dim=-1).to(q.dtype)
            out[start] = torch.matmul(probs, values.to(q.dtype).transpose(0, 1)).view(-1, head_dim)
            continue
        attn = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1).unsqueeze(0),
            keys.to(q.dtype).transpose(0, 1).unsqueeze(0),
            values.to(q.dtype).transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None and q_len > 1,
            scale=scale,
            enable_gqa=True,
        )
        out[start:end] = attn.squeeze(0).transpose(0, 1)
    return out
