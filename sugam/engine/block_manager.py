"""Hands out fixed-size KV-cache blocks from a preallocated pool, with prefix caching.

Blocks are reference-counted. A block whose tokens are all computed gets a hash chained over
every block before it (so equal hashes mean equal prefixes), and is registered for reuse: a new
sequence whose prompt starts with the same tokens takes those blocks instead of recomputing them.
The token ids are kept next to the hash and compared, so a hash collision can never hand out the
wrong keys and values. A sequence's `cache_salt` (e.g. its LoRA adapter) starts the chain, so
requests whose K/V differ for the same tokens never share blocks. A cached block that nobody uses
stays in the free list, in least-recently used order, and keeps its contents until the pool needs
the space. `truncate` takes a sequence's newest tokens back (a rejected speculative guess).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0      # of those, found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, oldest release first; cached ones among them can still be reused.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # chained hash -> block id
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    # ---- prefix cache -------------------------------------------------------------------------

    def _chain(self, previous: int | None, tokens: tuple[int, ...]) -> int:
        return hash((previous, tokens))

    def _chain_start(self, seq: Sequence) -> int | None:
        return None if seq.cache_salt is None else hash(("salt", seq.cache_salt))

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of `seq`'s tokens (at least one token is left
        to compute, so the model still produces logits for the next token)."""
        if not self.enable_prefix_caching or seq.block_table or seq.params.seed is not None:
            # A seeded request computes its whole prompt, so that it repeats exactly: a prompt
            # partly served from the cache takes other kernels and can differ in the last bits.
            return []
        tokens, bs = seq.all_token_ids, self.block_size
        found: list[int] = []
        previous = self._chain_start(seq)
        for start in range(0, len(tokens) - 1 - bs + 1, bs):
            chunk = tuple(tokens[start:start + bs])
            previous = self._chain(previous, chunk)
            block_id = self._cached.get(previous)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            found.append(block_id)
        return found

    def can_admit(self, seq: Sequence, prefix: list[int], num_tokens: int) -> bool:
        """Whether `seq` can take `prefix` and grow to cover `num_tokens` tokens."""
        reused_free = sum(1 for b in prefix if self.blocks[b].ref_count == 0)
        need = -(-num_tokens // self.block_size) - len(prefix)
        return need <= len(self._free) - reused_free

    def take_prefix(self, seq: Sequence, prefix: list[int]) -> None:
        for block_id in prefix:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(block.hash)  # type: ignore[arg-type]
        seq.num_computed_tokens = len(prefix) * self.block_size
        if self.enable_prefix_caching:
            self.stats.queried_tokens += seq.num_tokens
            self.stats.hit_tokens += seq.num_computed_tokens

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Make the blocks of `seq` that are now full of computed tokens findable by later requests."""
        if not self.enable_prefix_caching:
            return
        bs, tokens = self.block_size, None
        while (len(seq.block_hashes) + 1) * bs <= seq.num_computed_tokens:
            index = len(seq.block_hashes)
            tokens = tokens or seq.all_token_ids
            chunk = tuple(tokens[index * bs:(index + 1) * bs])
            h = self._chain(seq.block_hashes[-1] if seq.block_hashes else self._chain_start(seq), chunk)
            block = self.blocks[seq.block_table[index]]
            if h not in self._cached:
                block.hash, block.token_ids = h, chunk
                self._cached[h] = block.block_id
            seq.block_hashes.append(h)

    # ---- allocation ---------------------------------------------------------------------------

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs so that its table covers `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        need = self.blocks_needed(seq, num_tokens)
        seq.block_table.extend(self.take_blocks(need))

    def take_blocks(self, count: int) -> list[int]:
        """`count` blocks for the caller's exclusive use, least recently released first."""
        if count > len(self._free):
            raise RuntimeError("KV pool exhausted")
        taken = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict it from the prefix cache
                if self._cached.get(block.hash) == block_id:
                    del self._cached[block.hash]
                block.hash = block.token_ids = None
            block.ref_count = 1
            taken.append(block_id)
        return taken

    def release_blocks(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; unreferenced ones return to the free list."""
        # Last blocks first, so that a prefix's tail is evicted before its head.
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep the K/V of `seq`'s first `num_tokens` tokens only; later slots will be written anew.

        Blocks past the kept tokens go back to the pool. The block the cut falls in will be written
        again, so it leaves the prefix cache; if another sequence shares it, this sequence lets go of
        it and recomputes the few kept tokens of that block later, in a block of its own.
        """
        bs = self.block_size
        num_tokens = min(num_tokens, seq.num_computed_tokens)
        keep_blocks = -(-num_tokens // bs)
        self.release_blocks(seq.block_table[keep_blocks:])
        del seq.block_table[keep_blocks:]
        del seq.block_hashes[num_tokens // bs:]
        seq.num_computed_tokens = num_tokens
        seq.num_draft_computed_tokens = min(seq.num_draft_computed_tokens, num_tokens)
        if num_tokens % bs == 0:
            return
        block = self.blocks[seq.block_table[-1]]
        if block.ref_count > 1:  # shared: never write into it
            self.release_blocks([seq.block_table.pop()])
            seq.num_computed_tokens = (keep_blocks - 1) * bs
            seq.num_draft_computed_tokens = min(seq.num_draft_computed_tokens, seq.num_computed_tokens)
        elif block.hash is not None:
            if self._cached.get(block.hash) == block.block_id:
                del self._cached[block.hash]
            block.hash = block.token_ids = None

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks; cached ones stay reusable until evicted."""
        self.release_blocks(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = seq.num_draft_computed_tokens = 0
