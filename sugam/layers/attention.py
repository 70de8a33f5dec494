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

from .. import native
from .rmsnorm import NATIVE_DTYPES


@dataclass
class AttentionMetadata:
    """Describes one flattened batch of tokens; built once per step and shared by all layers."""
    slot_mapping: torch.Tensor          # [tokens] long: cache slot (block * block_size + offset) of each token
    query_starts: list[int]             # first token of each sequence in the flattened batch
    query_lens: list[int]               # tokens each sequence brings this step
    context_lens: list[int]             # tokens of each sequence in the cache after this step
    block_tables: list[torch.Tensor]    # per sequence: long tensor of block ids covering context_lens
    causal_masks: list[torch.Tensor | None]  # per sequence: bool mask when a chunk follows cached tokens
    # Sequences that bring one token, for sugam's CPU decode-attention kernel (None where it does not run)
    decode_tokens: torch.Tensor | None = None   # [n] long: their rows in the flattened batch
    decode_tables: torch.Tensor | None = None   # [n, max blocks] long, padded with 0
    decode_lens: torch.Tensor | None = None     # [n] long

    @classmethod
    def build(cls, slot_mapping: torch.Tensor, query_lens: list[int], context_lens: list[int],
              block_tables: list[torch.Tensor]) -> AttentionMetadata:
        starts: list[int] = []
        masks: list[torch.Tensor | None] = []
        offset = 0
        device = slot_mapping.device
        for q_len, ctx_len in zip(query_lens, context_lens):
            starts.append(offset)
            offset += q_len
            if q_len == 1 or q_len == ctx_len:
                masks.append(None)  # decode: sees everything; fresh prefill: plain causal
            else:
                query_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)
                masks.append(torch.arange(ctx_len, device=device)[None, :] <= query_pos[:, None])
        meta = cls(slot_mapping, starts, query_lens, context_lens, block_tables, masks)
        decoding = [i for i, q_len in enumerate(query_lens) if q_len == 1]
        if decoding and device.type == "cpu" and native.available():
            width = max(len(block_tables[i]) for i in decoding)
            tables = torch.zeros(len(decoding), width, dtype=torch.long)
            for row, i in enumerate(decoding):
                tables[row, :len(block_tables[i])] = block_tables[i]
            meta.decode_tokens = torch.tensor([starts[i] for i in decoding], dtype=torch.long)
            meta.decode_tables = tables
            meta.decode_lens = torch.tensor([context_lens[i] for i in decoding], dtype=torch.long)
        return meta


class KVCache:
    """One layer's paged cache: keys and values [num_blocks, block_size, kv_heads, head_dim].

    In the model dtype by default. With int8 storage each cached key/value vector (one token, one
    head) is kept as int8 codes plus one float32 scale (max |x| / 127): 68 bytes instead of 128
    for head_dim 64 in bf16, so the same memory holds 1.9x the tokens (long reasoning traces are
    KV-bound), at a rounding error of at most half a step per element.
    """

    def __init__(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, int8: bool = False):
        shape = (num_blocks, block_size, kv_heads, head_dim)
        store = torch.int8 if int8 else dtype
        # Zero-filled, not empty: the pool's pages are touched once here, so memory use is known at
        # start-up and stays flat under traffic instead of creeping up as new blocks come into use.
        self.keys = torch.zeros(shape, dtype=store, device=device)
        self.values = torch.zeros(shape, dtype=store, device=device)
        self.key_scales = torch.zeros(shape[:3], dtype=torch.float32, device=device) if int8 else None
        self.value_scales = torch.zeros(shape[:3], dtype=torch.float32, device=device) if int8 else None

    @staticmethod
    def bytes_per_token_per_layer(kv_heads: int, head_dim: int, dtype: torch.dtype, int8: bool = False) -> int:
        if int8:
            return 2 * kv_heads * (head_dim + 4)
        return 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kv_heads, head_dim = k.shape[1], k.shape[2]
        for cache, scales, x in ((self.keys, self.key_scales, k), (self.values, self.value_scales, v)):
            flat = cache.view(-1, kv_heads, head_dim)
            if scales is None:
                flat.index_copy_(0, slots, x.to(cache.dtype))
                continue
            x = x.float()
            scale = x.abs().amax(-1).clamp_(min=1e-12) / 127
            codes = torch.round(x / scale[..., None]).to(torch.int8)
            flat.index_copy_(0, slots, codes)
            scales.view(-1, kv_heads).index_copy_(0, slots, scale)

    def gather(self, table: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` cached keys and values of a sequence, [length, kv_heads, head_dim]."""
        kv_heads, head_dim = self.keys.shape[2], self.keys.shape[3]
        keys = self.keys[table].view(-1, kv_heads, head_dim)[:length]
        values = self.values[table].view(-1, kv_heads, head_dim)[:length]
        if self.key_scales is None or self.value_scales is None:  # both or neither
            return keys.to(dtype), values.to(dtype)
        key_scales = self.key_scales[table].view(-1, kv_heads)[:length, :, None]
        value_scales = self.value_scales[table].view(-1, kv_heads)[:length, :, None]
        return (keys.to(dtype) * key_scales.to(dtype)), (values.to(dtype) * value_scales.to(dtype))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]. Returns [tokens, heads, dim]."""
    kv_heads, head_dim = k.shape[1], k.shape[2]
    cache.write(meta.slot_mapping, k, v)

    out = torch.empty_like(q)
    # Decoding sequences in one call of sugam's kernel, the one the native decoder calls (bf16 or fp32).
    tokens, tables, lens = meta.decode_tokens, meta.decode_tables, meta.decode_lens  # all set or none
    native_decode = False
    if tokens is not None and tables is not None and lens is not None and q.dtype in NATIVE_DTYPES and head_dim % 16 == 0:
        native_decode = True
        every_token = len(tokens) == q.shape[0]
        rows = q.contiguous() if every_token else q[tokens]
        attended = native.decode_attention(rows, cache.keys, cache.values, cache.key_scales, cache.value_scales,
                                           tables, lens, scale)
        if every_token:
            return attended
        out[tokens] = attended
    for start, q_len, ctx_len, table, mask in zip(meta.query_starts, meta.query_lens, meta.context_lens,
                                                  meta.block_tables, meta.causal_masks):
        if q_len == 1 and native_decode:
            continue
        end = start + q_len
        if q_len == ctx_len:  # nothing cached before this chunk: use the fresh keys directly
            keys, values = k[start:end], v[start:end]
        else:
            keys, values = cache.gather(table, ctx_len, q.dtype)
        if q_len == 1:
            # Decode: the query heads sharing a KV head become rows of one query (exact, 3-4x faster
            # than enable_gqa on CPU), as three plain ops: SDPA's math path for this shape costs
            # ~65 µs a layer in dispatch alone.
            grouped = q[start].view(kv_heads, -1, head_dim)
            scores = torch.matmul(grouped, keys.permute(1, 2, 0)).float().mul_(scale)
            probs = torch.softmax(scores, dim=-1).to(q.dtype)
            out[start] = torch.matmul(probs, values.transpose(0, 1)).view(-1, head_dim)
            continue
        attn = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1).unsqueeze(0),
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None and q_len > 1,
            scale=scale,
            enable_gqa=True,
        )
        out[start:end] = attn.squeeze(0).transpose(0, 1)
    return out
