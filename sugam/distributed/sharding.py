"""Which part of each matrix a tensor-parallel rank holds (Megatron-style).

q, k, v and gate, up are split by output rows: each rank owns whole attention heads (and the KV
heads they read) and a range of MLP channels. o and down are split by input columns to match, so
each rank's products are partial sums, added by one all-reduce after each (distributed/parallel.py).
Their biases stay on rank 0 only, so that the sum adds them once. Norms, the embedding and the
rotary tables are whole on every rank. The LM head is used by rank 0 alone (only it samples), so it
is not split: splitting it by vocabulary would add a gather per step for no saving on this path.

GGUF matrices are cut between their quantization blocks, so every rank keeps the file's own blocks
and sugam's kernels: rows are independent, and column cuts fall on block boundaries. The MLP
channels are dealt out in units of the down projection's block (256 for K-quants), unevenly where
their count is not a multiple of the ranks (Qwen2.5-0.5B: 19 units of 256 -> 2560 + 2304). Where a
column cut cannot fall on a block boundary, that matrix slice is dequantized (and logged).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import SugamError

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    world_size: int
    heads: tuple[int, int]        # this rank's query heads [start, end)
    kv_heads: tuple[int, int]
    channels: tuple[int, int]     # this rank's MLP channels [start, end)
    head_dim: int

    @classmethod
    def build(cls, cfg: ModelConfig, rank: int, world_size: int, channel_unit: int = 1) -> ShardPlan:
        """`channel_unit`: MLP channels are dealt out in multiples of it (the down matrix's block)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise SugamError(f"rank {rank} of {world_size}")
        if cfg.is_moe and world_size > 1:
            raise SugamError(f"--tensor-parallel-size {world_size}: {cfg.architecture} is a mixture-of-experts "
                             "model, and sugam does not split experts over ranks yet; run it with one process")
        h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        if kv % world_size or h % world_size:
            raise SugamError(f"--tensor-parallel-size {world_size} must divide the model's {kv} key/value heads "
                             f"and {h} query heads (each rank holds whole heads)")
        unit = channel_unit if cfg.intermediate_size % channel_unit == 0 else 1
        units = cfg.intermediate_size // unit
        if units < world_size:
            raise SugamError(f"{cfg.intermediate_size} MLP channels cannot be split over {world_size} ranks")
        c0, c1 = rank * units // world_size * unit, (rank + 1) * units // world_size * unit
        return cls(rank, world_size, (rank * h // world_size, (rank + 1) * h // world_size),
                   (rank * kv // world_size, (rank + 1) * kv // world_size), (c0, c1), cfg.head_dim)

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        return dataclasses.replace(cfg, num_attention_heads=self.heads[1] - self.heads[0],
                                   num_key_value_heads=self.kv_heads[1] - self.kv_heads[0],
                                   intermediate_size=self.channels[1] - self.channels[0])

    def cut(self, name: str) -> tuple[str, int, int] | None:
        """How tensor `name` (HF naming) is cut: ("rows" | "cols" | "rank0", start, end), or None (whole)."""
        match = _LAYER.match(name)
        if match is None:
            return None
        module, kind = match.group(2), match.group(3)
        d = self.head_dim
        if module == "q_proj":
            return "rows", self.heads[0] * d, self.heads[1] * d
        if module in ("k_proj", "v_proj"):
            return "rows", self.kv_heads[0] * d, self.kv_heads[1] * d
        if module in ("gate_proj", "up_proj"):
            return "rows", self.channels[0], self.channels[1]
        if module in ("o_proj", "down_proj"):
            if kind == "bias":
                return "rank0", 0, 0
            start, end = (self.heads[0] * d, self.heads[1] * d) if module == "o_proj" else self.channels
            return "cols", start, end
        return None

    def shard_dense(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        cut = self.cut(name)
        if cut is None:
            return tensor
        how, start, end = cut
        if how == "rank0":
            return tensor if self.rank == 0 else torch.zeros_like(tensor)
        if how == "rows":
            return tensor[start:end].contiguous()
        return tensor[:, start:end].contiguous()

    def shard_gguf(self, name: str, tensor):
        """A GGUF tensor's share for this rank: a GGUFTensor of the file's blocks, or a float tensor
        where a column cut falls inside a block."""
        from gguf import GGML_QUANT_SIZES

        from ..loader.gguf import GGUFTensor

        cut = self.cut(name)
        if cut is None:
            return tensor
        how, start, end = cut
        if how == "rank0":
            return tensor if self.rank == 0 else torch.zeros(tensor.shape)
        raw = tensor.raw
        if len(tensor.shape) == 1:  # a bias: float values, cut like the rows they belong to
            values = np.ascontiguousarray(raw.reshape(-1)[start:end]).reshape(*raw.shape[:-1], end - start)
            return GGUFTensor(tensor.name, tensor.qtype, (end - start,), values)
        if how == "rows":
            shape = (end - start, *tensor.shape[1:])
            return GGUFTensor(tensor.name, tensor.qtype, shape, np.ascontiguousarray(raw[start:end]))
        rows, cols = tensor.shape
        block, block_bytes = GGML_QUANT_SIZES[tensor.qtype]
        if start % block or end % block:
            log.info("%s: columns %d-%d cut inside its %d-wide %s blocks; this slice is dequantized",
                     name, start, end, block, tensor.qtype.name)
            return tensor.dequantize()[:, start:end].contiguous()
        raw2 = raw.reshape(rows, -1)
        if block == 1:  # float types: raw holds the values
            sliced = raw2[:, start:end]
        else:
            sliced = raw2[:, start // block * block_bytes:end // block * block_bytes]
        return GGUFTensor(tensor.name, tensor.qtype, (rows, end - start), np.ascontiguousarray(sliced))


def channel_unit(checkpoint) -> int:
    """The block width of the down matrices' file type (1 for float files): the unit MLP channels
    are dealt out in, so that every rank's columns of down start on a block."""
    gguf = checkpoint.info.get("gguf_file")
    if gguf is None:
        return 32   # dense checkpoints: int4 groups of 32 run along the columns
    from gguf import GGML_QUANT_SIZES

    widths = [GGML_QUANT_SIZES[t.qtype][0] for name, t in gguf.tensors.items() if name.endswith("ffn_down.weight")]
    return max(widths, default=1)
