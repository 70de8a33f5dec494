"""The synchronous engine: validates requests and runs steps.

A step is: schedule (scheduler.py) -> batch (batch.py) -> execute (runner.py) -> sample
(sampler.py) -> process outputs (output_processor.py) -> update the scheduler. Each part owns its
state; this file wires them together and validates what callers send.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from dataclasses import dataclass

import torch

from ..distributed.parallel import TensorParallel
from ..errors import PromptTooLongError, SugamError
from ..loader.base import LoadedCheckpoint
from ..lora.adapter import LoRAAdapter, LoRAError, LoRARequest
from ..sampling_params import InvalidRequestError, SamplingParams
from ..tokenizer import Tokenizer
from .batch import BatchEntry, ForwardBatch
from .block_manager import BlockManager
from .lora_manager import LoadedLoRA, LoRAManager
from .output_processor import OutputProcessor
from .runner import ModelRunner, describe_path, kv_bytes_per_token
from .sampler import Sampler
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence
from .speculative import (
    CPU_SPECULATIVE_STEP_ROWS,
    DraftModelProposer,
    NgramProposer,
    SpeculationStats,
    SpeculativeConfig,
    Speculator,
)
from .structured import GrammarCompiler

log = logging.getLogger(__name__)


class KVPoolBusyError(SugamError):
    """The KV pool has no room right now for work outside the scheduler (an embedding); retry shortly."""


@dataclass
class EngineStats:
    """A snapshot of what the engine is doing, for logs and the server's /metrics."""
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_block_size: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_preemptions: int
    num_steps: int
    last_step_tokens: int            # tokens in the latest forward pass
    tokens_computed: int             # all tokens run through the model (prompts, recomputes, decodes)
    generated_tokens: int
    speculation: SpeculationStats | None = None   # when speculative decoding is on

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / q if q else 0.0


@dataclass
class EngineConfig:
    max_model_len: int | None = None        # default: the model's context length (capped by the KV pool)
    block_size: int = 16                    # tokens per KV block
    kv_cache_memory: int | None = None      # bytes for the KV pool; default: a quarter of free memory
    max_num_seqs: int = 64                  # sequences running at once
    max_num_batched_tokens: int = 2048      # tokens in one forward pass (longer prompts are chunked)
    enable_prefix_caching: bool = True      # reuse KV blocks of prompts that share a prefix
    quantization: str = "auto"              # weights in memory: auto, none, gguf, int8, int4 (sugam/quant/policy.py)
    kv_cache_dtype: str = "auto"            # auto (the model dtype), bf16 (half of fp32's bytes) or int8 (about half of bf16's)
    speculative: SpeculativeConfig | None = None  # guess tokens and verify them (docs/SPECULATIVE.md)
    enable_lora: bool = False               # serve LoRA adapters (docs/CUSTOMIZE.md)
    max_loras: int = 4                      # adapters in one batch (= LoRA slots in memory)
    max_lora_rank: int = 16                 # the largest adapter rank accepted
    tensor_parallel_size: int = 1           # ranks each layer is split over (docs/DISTRIBUTED.md)
    cpus_per_rank: int | None = None        # CPU threads per rank (default: an equal share)
    distributed_timeout: float = 60.0       # seconds a collective may wait for a rank before failing
    batch_invariant: bool = False           # a request's tokens never depend on the rest of the batch (docs/BATCH_INVARIANCE.md)


KV_CACHE_DTYPES = ("auto", "bf16", "int8")


def available_memory(device: torch.device) -> int:
    """Bytes the KV pool may draw from on this device."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class LLMEngine:
    def __init__(self, checkpoint: LoadedCheckpoint, device: torch.device, dtype: torch.dtype,
                 config: EngineConfig | None = None, draft_checkpoint: LoadedCheckpoint | None = None,
                 tp: TensorParallel | None = None):
        """`draft_checkpoint`: the draft model, when config.speculative asks for one. `tp`: rank 0 of
        a tensor-parallel group (distributed/worker.py starts one)."""
        self.config = config or EngineConfig()
        self.tp = tp
        if tp is not None and (self.config.enable_lora or draft_checkpoint is not None):
            raise SugamError("LoRA adapters and draft models do not run with --tensor-parallel-size > 1 yet")
        self.model_config = checkpoint.config
        self.device = device
        self.tokenizer = Tokenizer(checkpoint.tokenizer)
        self.generation_defaults = checkpoint.generation
        self.eos_token_ids = list(checkpoint.generation.eos_token_ids or checkpoint.config.eos_token_ids)
        self.runner = ModelRunner(checkpoint, device, dtype, self.config.quantization, tp=tp,
                                  batch_invariant=self.config.batch_invariant)
        self.loras: LoRAManager | None = None
        if self.config.enable_lora:
            self.loras = self.runner.enable_lora(self.config.max_loras, self.config.max_lora_rank)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        think, end_think = self.tokenizer.token_to_id("<think>"), self.tokenizer.token_to_id("</think>")
        self.think_token_ids = (think, end_think) if think is not None and end_think is not None else None
        self.outputs = OutputProcessor(self.tokenizer, self.eos_token_ids, self.think_token_ids)
        self.sampler = Sampler(self.tokenizer, self.outputs)

        cfg, bs = self.config, self.config.block_size
        if bs <= 0 or cfg.max_num_seqs <= 0 or cfg.max_num_batched_tokens <= 0:
            raise InvalidRequestError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        context = self.model_config.context_length
        self.max_model_len = min(cfg.max_model_len or context, context)
        if cfg.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise InvalidRequestError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                                      f"not {cfg.kv_cache_dtype!r}")
        kv_int8 = cfg.kv_cache_dtype == "int8"
        # bf16 storage halves an fp32 model's cache (CPUs without bf16 arithmetic compute in fp32);
        # the attention reads it in the compute dtype.
        cache_dtype = torch.bfloat16 if cfg.kv_cache_dtype == "bf16" else dtype
        per_token = kv_bytes_per_token(self.model_config, cache_dtype, kv_int8)
        budget = cfg.kv_cache_memory
        if budget is None:
            budget = min(available_memory(device) // 4, per_token * self.max_model_len * cfg.max_num_seqs)
        num_blocks = max(1, budget // (per_token * bs))
        if num_blocks * bs < self.max_model_len:
            log.warning("KV pool holds %d tokens; limiting the context from %d to that",
                        num_blocks * bs, self.max_model_len)
            self.max_model_len = num_blocks * bs
        self.runner.allocate_kv_cache(num_blocks, bs, kv_int8, cache_dtype)
        self.block_manager = BlockManager(num_blocks, bs, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   cfg.max_loras if cfg.enable_lora else None, cfg.batch_invariant)
        log.info("KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB), context %d",
                 num_blocks, bs, num_blocks * bs, num_blocks * bs * per_token / 2**20, self.max_model_len)

        self.speculator: Speculator | None = None
        if cfg.speculative is not None:
            self.speculator = self._build_speculator(cfg.speculative, draft_checkpoint, num_blocks, kv_int8,
                                                     cache_dtype)

        self._ids = itertools.count()
        self._num_steps = self._last_step_tokens = self._tokens_computed = self._generated_tokens = 0

    # ---- requests -----------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, lora_request: LoRARequest | None = None) -> Sequence:
        """Validate a request and queue it; raises InvalidRequestError / PromptTooLongError /
        LoRAError. Safe to call from any thread (the request joins at the next step)."""
        seq = self.create_sequence(prompt, params, request_id, lora_request)
        self.scheduler.submit(seq)
        return seq

    def create_sequence(self, prompt: str | list[int], params: SamplingParams | None = None,
                        request_id: str | None = None, lora_request: LoRARequest | None = None) -> Sequence:
        """Validate and tokenize a request without queueing it (the async engine queues it later).
        `lora_request`: the adapter to use, by name (loaded with add_lora before)."""
        lora = self._lora_for(lora_request) if lora_request is not None else None
        params = (params or SamplingParams()).with_defaults(self.generation_defaults)
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, [int(t) for t in prompt]
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(f"the prompt has {len(token_ids)} tokens but the context holds "
                                     f"{self.max_model_len}; shorten it or raise --max-model-len")
        generator = torch.Generator(device=self.device)
        generator.manual_seed(params.seed if params.seed is not None else random.SystemRandom().getrandbits(63))
        grammar = None
        if params.json_schema is not None or params.regex is not None:
            grammar = self.grammars.matcher(params.json_schema, params.regex)
        seq = Sequence(request_id or str(next(self._ids)), text, token_ids, params, self.max_model_len,
                       generator, self.outputs.text_state(token_ids, params), grammar,
                       cache_salt=lora.cache_salt if lora else None)
        seq.lora = lora
        return seq

    # ---- LoRA adapters ----------------------------------------------------------------------------

    def add_lora(self, request: LoRARequest, adapter: LoRAAdapter | None = None) -> LoadedLoRA:
        """Load and register an adapter (raises LoRAError with the reason; nothing half-loaded)."""
        return self._lora_manager().add(request, adapter)

    def remove_lora(self, name: str) -> bool:
        """Forget an adapter (requests using it finish with it). True if it was loaded."""
        return self.loras is not None and self.loras.remove(name)

    def list_loras(self) -> list[LoRARequest]:
        return [lora.request for lora in self.loras.list()] if self.loras else []

    def _lora_manager(self) -> LoRAManager:
        if self.loras is None:
            raise LoRAError("LoRA adapters are off: start with --lora / --enable-lora (LLM(enable_lora=True))")
        return self.loras

    def _lora_for(self, request: LoRARequest) -> LoadedLoRA:
        loaded = self._lora_manager().get(request.lora_name)
        if loaded is None:
            raise LoRAError(f"no LoRA adapter named {request.lora_name!r} is loaded")
        return loaded

    # ---- embeddings ------------------------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, token_ids: list[int]) -> list[float]:
        """The final hidden states of `token_ids` (after the model's last norm), mean-pooled over the
        tokens and L2-normalised; the base model's, without LoRA. A prefill in chunks of
        max_num_batched_tokens into KV blocks borrowed from the free pool and given back at once:
        no request's blocks, no prefix cache entry, no sampling. Not thread-safe against step():
        call it between steps (AsyncLLMEngine.embed does). Raises InvalidRequestError,
        PromptTooLongError, or KVPoolBusyError when the free blocks do not hold the input now."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise InvalidRequestError("the input is empty")
        if any(not 0 <= t < self.model_config.vocab_size for t in ids):
            raise InvalidRequestError(f"token ids must be in [0, {self.model_config.vocab_size})")
        if len(ids) > self.max_model_len:
            raise PromptTooLongError(f"the input has {len(ids)} tokens but the context holds {self.max_model_len}")
        bm, runner = self.block_manager, self.runner
        need = -(-len(ids) // bm.block_size)
        if need > bm.num_free_blocks:
            raise KVPoolBusyError(f"the KV cache has no room for {len(ids)} tokens now; retry shortly")
        table = bm.take_blocks(need)
        try:
            total = torch.zeros(self.model_config.hidden_size, dtype=torch.float32, device=self.device)
            step = self.config.max_num_batched_tokens
            for start in range(0, len(ids), step):
                batch = ForwardBatch.build([BatchEntry(ids[start:start + step], start, table, 0)], bm.block_size,
                                           self.device)
                total += runner.forward(batch).float().sum(dim=0)  # no LoRA groups: the base model
        finally:
            bm.release_blocks(table)
        return torch.nn.functional.normalize(total / len(ids), dim=0).tolist()

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and give its KV blocks back (call it from the engine's thread; other
        threads use `scheduler.request_abort`). True if it was found."""
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; return outputs of the sequences that produced a token or finished."""
        spec = self.speculator
        scheduled = self.scheduler.schedule(spec.lookahead if spec else None)
        if not scheduled:
            return []
        if spec:
            spec.propose(scheduled)
        lora_slots = None
        if self.loras is not None:
            lora_slots = self.loras.activate((s.seq.lora for s in scheduled.scheduled if s.seq.lora),
                                             {seq.lora for seq in self.scheduler.running if seq.lora})
        batch = ForwardBatch.from_schedule(scheduled, self.block_manager.block_size, self.device, lora_slots)
        logits = self.runner.execute(batch)
        outputs, num_kept, row = [], [], 0
        for entry in scheduled.scheduled:
            seq, kept = entry.seq, entry.num_tokens
            if entry.samples:
                assert logits is not None
                before = len(seq.output_token_ids)
                if entry.draft_token_ids and spec:
                    kept = entry.num_new_tokens + spec.verify(entry, logits[row:row + entry.num_logits],
                                                              self.sampler, self.outputs)
                else:
                    token, logprobs = self.sampler.sample(logits[row], seq)
                    self.outputs.append(seq, token, logprobs)
                row += entry.num_logits
                self._generated_tokens += len(seq.output_token_ids) - before
                outputs.append(self.outputs.output(seq))
            num_kept.append(kept)
        self.scheduler.update(scheduled, num_kept)
        self._num_steps += 1
        self._last_step_tokens = scheduled.num_batched_tokens
        self._tokens_computed += self._last_step_tokens
        return outputs

    def _build_speculator(self, spec: SpeculativeConfig, draft: LoadedCheckpoint | None, num_blocks: int,
                          kv_int8: bool, cache_dtype: torch.dtype | None = None) -> Speculator:
        step_rows = spec.max_step_rows or (CPU_SPECULATIVE_STEP_ROWS if self.device.type == "cpu" else None)
        if spec.method == "ngram":
            return Speculator(spec, NgramProposer(spec), self.max_model_len, step_rows)
        if draft is None:
            raise SugamError(f"the draft model {spec.model!r} was not loaded")
        draft_vocab = Tokenizer(draft.tokenizer).backend.get_vocab()
        vocab = self.tokenizer.backend.get_vocab()
        if draft_vocab != vocab:
            differing = sum(1 for t, i in vocab.items() if draft_vocab.get(t) != i)
            raise SugamError(f"the draft model {spec.model!r} has another vocabulary than the target "
                             f"({len(draft_vocab)} vs {len(vocab)} tokens, {differing} differ): a draft must "
                             f"share the target's tokenizer (e.g. a smaller model of the same family)")
        runner = ModelRunner(draft, self.device, self.runner.dtype, self.config.quantization)
        runner.allocate_kv_cache(num_blocks, self.block_manager.block_size, kv_int8, cache_dtype)
        log.info("draft model: %s", describe_path(runner.execution_path()))
        return Speculator(spec, DraftModelProposer(runner, self.block_manager.block_size), self.max_model_len, step_rows)

    def stats(self) -> EngineStats:
        """Safe to call from any thread (the counters are read without a lock: a snapshot may be
        a step old)."""
        bm, counts = self.block_manager, self.scheduler.counts()
        return EngineStats(
            num_running=counts.num_running, num_waiting=counts.num_waiting,
            kv_blocks_used=bm.num_used_blocks, kv_blocks_total=bm.num_blocks, kv_block_size=bm.block_size,
            prefix_cache_queried_tokens=bm.stats.queried_tokens, prefix_cache_hit_tokens=bm.stats.hit_tokens,
            num_preemptions=self.scheduler.num_preemptions, num_steps=self._num_steps,
            last_step_tokens=self._last_step_tokens, tokens_computed=self._tokens_computed,
            generated_tokens=self._generated_tokens,
            speculation=self.speculator.stats if self.speculator else None)
