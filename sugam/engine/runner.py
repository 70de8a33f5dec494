"""Loads the model onto a device, owns the KV cache, and runs one batched forward per step.

`execute(ForwardBatch)` is the one place that chooses how a step runs: through the native decoder
(all layers in one C++ call) when the model declares it and the step is one it takes, else
through the Python layers. With batch invariance on, it also names the path of every row of the
step (decode rows: the kernels; prompt rows: the GEMM in fixed tiles; quant/linear.py rows_path). Models come from the registry by architecture (models/registry.py).
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from .. import native as native_kernels
from ..config import ModelConfig
from ..distributed.parallel import BATCH, KV_CACHE, STOP, TensorParallel, split_layers
from ..distributed.sharding import ShardPlan, channel_unit
from ..errors import SugamError
from ..hardware import cpu_model, native_bf16
from ..layers.attention import KVCache
from ..loader.base import LoadedCheckpoint
from ..models.native_decode import NativeDecoder
from ..models.registry import model_class
from ..quant.arena import gather_quantized_weights, return_freed_memory
from ..quant.formats import int4_layout
from ..quant.linear import GGUFRowEmbedding, QuantizedEmbedding, QuantizedLinear, rows_path
from ..quant.policy import checkpoint_mode, weight_chooser
from .batch import ForwardBatch
from .lora_manager import LoRAManager

log = logging.getLogger(__name__)


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, int8: bool = False) -> int:
    return cfg.num_hidden_layers * KVCache.bytes_per_token_per_layer(
        cfg.num_key_value_heads, cfg.head_dim, dtype, int8)


class ModelRunner:
    def __init__(self, checkpoint: LoadedCheckpoint, device: torch.device, dtype: torch.dtype,
                 quantization: str = "auto", tp: TensorParallel | None = None, batch_invariant: bool = False):
        """`tp`: this process's place in a tensor-parallel group; the runner then holds this rank's
        share of every layer (distributed/sharding.py) and rank 0 sends each step to the others.
        `batch_invariant`: a row's result never depends on the other rows of its step (the scheduler
        keeps prompt chunks and decode rows in separate steps)."""
        self.config = checkpoint.config
        self.device, self.dtype = device, dtype
        self.tp = tp
        self.quantization = checkpoint_mode(quantization, checkpoint.info, device.type)
        shard = None
        self.local_config = self.config     # this rank's heads and channels (all of them without tp)
        if tp is not None:
            shard = ShardPlan.build(self.config, tp.rank, tp.world_size, channel_unit(checkpoint))
            self.local_config = shard.local_config(self.config)
        with torch.device("meta"):
            model = model_class(self.config.architecture)(self.local_config).to(dtype)
        # Parameters get real, uninitialised storage in the final dtype, then the checkpoint fills
        # them. Storage never written (a matrix that arrives quantized) is never touched, so it
        # costs no memory before the quantized module replaces it.
        model = model.to_empty(device=device)
        model.rotary.init_frequencies(device)
        packed_kernels = self.quantization == "gguf" and device.type == "cpu" and native_kernels.available()
        chooser = weight_chooser(self.quantization, self.config.tie_word_embeddings, packed_kernels)
        model.load_weights(checkpoint.iter_weights(chooser, shard=shard) if shard else checkpoint.iter_weights(chooser))
        model.fuse_projections()
        if tp is not None:
            split_layers(model, tp)
            if not tp.is_driver and hasattr(model, "lm_head"):
                del model.lm_head       # only rank 0 computes logits
        if device.type == "cpu":
            gather_quantized_weights(model, QuantizedLinear)
        self.native_decoder = NativeDecoder.build(model)
        self.native_decoder_steps = 0      # steps it ran (for tests and the curious)
        self.lora: LoRAManager | None = None
        self.model = model.eval()
        self.batch_invariant = batch_invariant
        if batch_invariant:
            self._check_batch_invariant()
        self.weight_bytes = sum(t.numel() * t.element_size()
                                for t in itertools.chain(model.parameters(), model.buffers()))
        return_freed_memory()
        self.kv_caches: list[KVCache] = []
        self.block_size = 0

    def _check_batch_invariant(self) -> None:
        """Batch invariance rests on sugam's CPU kernels and tiles of the quantized matmuls; dense
        matrices (PyTorch's GEMMs block by the number of rows) and other devices do not have it."""
        dense = [name for name, m in self.model.named_modules() if type(m) is nn.Linear]
        if self.device.type != "cpu" or dense or self.tp is not None:
            why = (f"the device is {self.device.type}" if self.device.type != "cpu"
                   else "tensor parallelism is on" if self.tp is not None
                   else f"{len(dense)} matrices are dense ({dense[0]}, ...; quantization {self.quantization!r})")
            raise SugamError(f"batch invariance needs quantized matrices on a CPU, one process (gguf, int8 or int4 "
                             f"weights), but {why}")

    def execution_path(self) -> dict[str, Any]:
        """What this model runs on, as chosen at load: device and CPU, kernels, weight formats (matrices
        per format after fusion) and compute dtype. Shown by `sugam run`, the server log and /v1/models."""
        weights: Counter[str] = Counter()
        for module in self.model.modules():
            if isinstance(module, QuantizedLinear):
                weights[f"{module.weight_format} {module.qtype}".strip()] += 1
            elif isinstance(module, GGUFRowEmbedding):
                weights[f"rows {module.qtype}"] += 1
            elif isinstance(module, QuantizedEmbedding):
                weights["int8"] += 1
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                weights[f"dense {str(module.weight.dtype).removeprefix('torch.')}"] += 1
        path: dict[str, Any] = {"device": str(self.device), "compute_dtype": str(self.dtype).removeprefix("torch."),
                                "quantization": self.quantization, "weights": dict(weights.most_common())}
        if self.device.type == "cpu":
            packed = any(k.startswith("packed") for k in weights)
            layout = int4_layout() if any(k.startswith("int4") for k in weights) else None
            path.update(cpu=cpu_model(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                        bf16="native" if native_bf16() else "emulated", threads=torch.get_num_threads(),
                        kernels=f"sugam {native_kernels.isa_label()}" if packed else "pytorch",
                        native_decoder=self.native_decoder is not None)
            if layout is not None:
                path["int4_packing"] = f"{layout.block_rows}-row blocks, {'adjacent' if layout.adjacent else 'halves'}"
        return path

    def allocate_kv_cache(self, num_blocks: int, block_size: int, int8: bool = False,
                          dtype: torch.dtype | None = None) -> None:
        """`dtype`: the cache's storage (default the model's; int8 overrides it)."""
        dtype = dtype or self.dtype
        if self.tp is not None and self.tp.is_driver:
            self.tp.send(KV_CACHE, {"num_blocks": num_blocks, "block_size": block_size, "int8": int8,
                                    "dtype": str(dtype).removeprefix("torch.")})
        cfg = self.local_config
        self.block_size = block_size
        self.kv_caches = [KVCache(num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim,
                                  dtype, self.device, int8)
                          for _ in range(cfg.num_hidden_layers)]

    def enable_lora(self, max_loras: int, max_rank: int) -> LoRAManager:
        """Give every layer LoRA slots (after loading; the native decoder is rebuilt to apply them)."""
        self.lora = LoRAManager(self.model, max_loras, max_rank)
        self.native_decoder = NativeDecoder.build(self.model)
        return self.lora

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states [tokens, hidden] of a batch (its K/V written to the cache)."""
        if self.tp is not None and self.tp.is_driver:
            self.tp.send(BATCH, batch.message())
        if self.lora is not None:
            self.lora.set_batch(batch.lora_groups)
        path = self._rows_path(batch)
        decoder = self.native_decoder
        if decoder is not None and (path == "gemm" or not decoder.runs(batch.num_tokens, batch.attention,
                                                                       any_size=self.batch_invariant)):
            decoder = None
        if decoder is not None:
            self.native_decoder_steps += 1
        with rows_path(path):
            return self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attention, decoder)

    def _rows_path(self, batch: ForwardBatch) -> str | None:
        """The path every row of the step takes under batch invariance (None: chosen by size)."""
        if not self.batch_invariant:
            return None
        return "gemm" if any(entry.prompt for entry in batch.entries) else "kernels"

    def follow(self) -> None:
        """A tensor-parallel rank other than 0: run the steps rank 0 sends until it says stop."""
        assert self.tp is not None and not self.tp.is_driver
        while True:
            kind, payload = self.tp.receive()
            if kind == STOP:
                return
            if kind == KV_CACHE:
                self.allocate_kv_cache(payload["num_blocks"], payload["block_size"], payload["int8"],
                                       getattr(torch, payload["dtype"]))
            elif kind == BATCH:
                self.forward(ForwardBatch.from_message(payload, self.block_size, self.device))

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def execute(self, batch: ForwardBatch) -> torch.Tensor | None:
        """Run a batch; logits [rows, vocab] float32 of its `logits_indices` rows, None when none are wanted."""
        hidden = self.forward(batch)
        if batch.logits_indices.numel() == 0:
            return None
        with rows_path("kernels" if self.batch_invariant else None):  # the head: always the kernels
            return self.model.compute_logits(hidden[batch.logits_indices])


def format_weights(weights: dict[str, int]) -> str:
    """{"packed Q5_0": 72, ...} -> "packed Q5_0 x72, ..." """
    return ", ".join(f"{name} x{count}" for name, count in weights.items())


def describe_path(path: dict[str, Any]) -> str:
    """One line for logs and the terminal, e.g. "cpu AMD EPYC (AVX512, bf16 native), sugam AVX-512 kernels,
    gguf weights: packed Q5_0 x120, ..., compute bfloat16"."""
    weights = format_weights(path["weights"])
    if path["device"] != "cpu":
        where = path["device"]
    else:
        where = (f"cpu {path['cpu']} ({path['cpu_capability']}, bf16 {path['bf16']}, {path['threads']} threads), "
                 f"{path['kernels'] if path['kernels'] != 'pytorch' else 'PyTorch'} kernels")
    return f"{where}; {path['quantization']} weights: {weights}; compute {path['compute_dtype']}"


