"""The Python API, shaped like vLLM's: `LLM(model=...)`, `generate`, `chat`, and streaming forms."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .distributed.sharding import ShardPlan
from .engine.llm_engine import EngineConfig, LLMEngine
from .engine.sequence import RequestOutput
from .engine.speculative import SpeculativeConfig
from .errors import SugamError
from .hardware import cpu_compute_dtype
from .loader import open_checkpoint
from .lora.adapter import LoRAError, LoRARequest
from .quant.policy import checkpoint_mode
from .registry import DEFAULT_MODEL, apply_alias_defaults, resolve
from .sampling_params import SamplingParams
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .distributed.parallel import TensorParallel
    from .evaluate import PerplexityResult

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}

Prompt = str | list[int]
Message = dict[str, Any]


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise SugamError(f"unknown device {device!r}: {exc}") from exc


def pick_dtype(dtype: str | torch.dtype, device: torch.device, quantized: bool = True) -> torch.dtype:
    """The compute dtype. "auto" on a CPU: bf16 where the CPU has bf16 arithmetic; elsewhere fp32 for
    quantized weights (their kernels take bf16 rows either way; emulated bf16 GEMMs are 2-3x slower
    than fp32) and bf16 for dense ones (half the memory of fp32 weights)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return cpu_compute_dtype() if quantized else torch.bfloat16
        # fp16 math is very slow on CPUs, MPS prefers fp16.
        return torch.float16 if device.type == "mps" else torch.bfloat16
    if dtype not in _DTYPES:
        raise SugamError(f"unknown dtype {dtype!r}; use auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def load_engine(path: Path, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None,
                config: EngineConfig | None = None, download: bool = True) -> LLMEngine:
    """Open a resolved model path (and the draft model of config.speculative, if any) and build the
    engine for it (the LLM API and the server share this)."""
    checkpoint = open_checkpoint(path)
    apply_alias_defaults(path, checkpoint.generation)
    dev = pick_device(device)
    config = config or EngineConfig()
    mode = config.quantization
    if mode == "auto" and dtype != "auto" and pick_dtype(dtype, dev) == torch.float32:
        mode = "none"  # an explicit float32 asks for the exact dense reference path
    mode = checkpoint_mode(mode, checkpoint.info, dev.type)
    config = dataclasses.replace(config, quantization=mode)
    compute = pick_dtype(dtype, dev, quantized=mode != "none")
    if config.kv_cache_dtype == "auto" and dtype == "auto" and dev.type == "cpu" and compute == torch.float32:
        # A CPU without bf16 arithmetic computes in fp32 but keeps K/V in bf16: half the bytes deep in a
        # long answer (0.5B at 8k tokens: 16.5 vs 10.2 tok/s on an Ice Lake) for a perplexity 0.01 %
        # above fp32 K/V (8k-token windows, benchmarks/results/depth-*.md, docs/QUANTIZATION.md).
        config = dataclasses.replace(config, kv_cache_dtype="bf16")
    draft = None
    if config.speculative is not None and config.speculative.model:
        draft = open_checkpoint(resolve(config.speculative.model, download=download))
    tp = None
    if config.tensor_parallel_size > 1:
        ShardPlan.build(checkpoint.config, 0, config.tensor_parallel_size)  # refuse a model it cannot split first
        tp = _tensor_parallel_group(path, dtype, dev, config)
    try:
        return LLMEngine(checkpoint, dev, compute, config, draft, tp)
    except BaseException:
        if tp is not None:
            tp.shutdown()
        raise


def _tensor_parallel_group(path: Path, dtype: str | torch.dtype, device: torch.device,
                           config: EngineConfig) -> TensorParallel:
    """Rank 0 of a tensor-parallel group: joined to torchrun's when this process was started by it,
    else with worker processes started here."""
    import atexit

    import torch.distributed as dist

    from .distributed.parallel import fingerprint
    from .distributed.worker import start_group, started_group, torchrun_group

    if dist.is_initialized() and started_group() is None:  # torchrun's group (python -m sugam.serve)
        tp = torchrun_group()
        if tp is None or tp.world_size != config.tensor_parallel_size or tp.rank != 0:
            raise SugamError(f"--tensor-parallel-size {config.tensor_parallel_size} but this process is rank "
                             f"{dist.get_rank()} of {dist.get_world_size()}")
        tp.check_same_model(fingerprint(path))
    else:
        tp = start_group(config.tensor_parallel_size, path, dtype, device, config.quantization,
                         config.cpus_per_rank, config.distributed_timeout)
    atexit.register(tp.shutdown)
    return tp


class LLM:
    """A model loaded for generation.

    >>> llm = LLM("qwen2.5-coder-0.5b-instruct")
    >>> out = llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=32))
    >>> print(out[0].outputs[0].text)
    """

    def __init__(self, model: str = DEFAULT_MODEL, dtype: str | torch.dtype = "auto",
                 device: str | torch.device | None = None, max_model_len: int | None = None,
                 kv_cache_memory: int | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, block_size: int = 16, enable_prefix_caching: bool = True,
                 quantization: str = "auto", kv_cache_dtype: str = "auto", download: bool = True,
                 speculative_config: dict[str, Any] | SpeculativeConfig | None = None,
                 enable_lora: bool = False, max_loras: int = 4, max_lora_rank: int = 16,
                 tensor_parallel_size: int = 1, cpus_per_rank: int | None = None, batch_invariant: bool = False):
        """`enable_lora`: serve LoRA adapters (pass `lora_request=LoRARequest(name, id, path)` to
        generate / chat / stream; up to `max_loras` adapters in one batch, ranks up to `max_lora_rank`).
        `batch_invariant`: a request's tokens never depend on what else runs (docs/BATCH_INVARIANCE.md)."""
        self.model_path = resolve(model, download=download)
        self.engine = load_engine(
            self.model_path, dtype, device,
            EngineConfig(max_model_len=max_model_len, block_size=block_size, kv_cache_memory=kv_cache_memory,
                         max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                         enable_prefix_caching=enable_prefix_caching, quantization=quantization,
                         kv_cache_dtype=kv_cache_dtype, enable_lora=enable_lora, max_loras=max_loras,
                         max_lora_rank=max_lora_rank, tensor_parallel_size=tensor_parallel_size,
                         cpus_per_rank=cpus_per_rank, batch_invariant=batch_invariant,
                         speculative=speculative_config if isinstance(speculative_config, SpeculativeConfig)
                         else SpeculativeConfig.parse(speculative_config)),
            download=download)

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def perplexity(self, text: str, context: int = 512, stride: int | None = None,
                   chunk: int | None = None) -> PerplexityResult:
        """Mean NLL and perplexity of `text` in sliding windows (see sugam.evaluate); `chunk`: each
        window computed that many tokens at a time through the KV cache (which then counts)."""
        from .evaluate import perplexity

        return perplexity(self.engine, self.engine.tokenizer.encode(text), context, stride, chunk=chunk)

    # ---- batch APIs -----------------------------------------------------------------------------

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool | None = None,
                 lora_request: LoRARequest | Seq[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Complete each prompt (text or token ids). Returns one RequestOutput per prompt, in order.
        `lora_request`: one adapter for all prompts, or a list with one per prompt (None: the base)."""
        batch = _as_prompt_list(prompts)
        param_list = list(params) if isinstance(params, Seq) else [params] * len(batch)
        if len(param_list) != len(batch):
            raise SugamError(f"{len(batch)} prompts but {len(param_list)} SamplingParams")
        lora_list = list(lora_request) if isinstance(lora_request, Seq) else [lora_request] * len(batch)
        if len(lora_list) != len(batch):
            raise SugamError(f"{len(batch)} prompts but {len(lora_list)} LoRA requests")
        for lora in lora_list:
            self._load_lora(lora)
        from tqdm import tqdm

        show = use_tqdm if use_tqdm is not None else len(batch) > 1 and sys.stderr.isatty()
        seqs = []
        results: list[RequestOutput | None] = [None] * len(batch)
        try:
            for prompt, sp, lora in zip(batch, param_list, lora_list):
                seqs.append(self.engine.add_request(prompt, sp, lora_request=lora))
            wanted = {s.request_id: i for i, s in enumerate(seqs)}
            with tqdm(total=len(seqs), desc="generate", unit="req", disable=not show, file=sys.stderr) as bar:
                while any(r is None for r in results) and self.engine.has_unfinished():
                    for out in self.engine.step():
                        if out.finished and out.request_id in wanted:
                            results[wanted[out.request_id]] = out
                            bar.update(1)
        except BaseException:
            for s in seqs:  # a bad prompt, Ctrl-C or an error: give every block back
                self.engine.abort_request(s.request_id)
            raise
        return results  # type: ignore[return-value]

    def chat(self, messages: list[Message] | list[list[Message]],
             params: SamplingParams | Seq[SamplingParams] | None = None, *, tools: list[dict] | None = None,
             add_generation_prompt: bool = True, chat_template_kwargs: dict[str, Any] | None = None,
             use_tqdm: bool | None = None,
             lora_request: LoRARequest | Seq[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of messages) or many (a list of such lists)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt(c, tools, add_generation_prompt, chat_template_kwargs)  # type: ignore[arg-type]
                   for c in conversations]  # (a list of conversations here)
        return self.generate(prompts, params, use_tqdm=use_tqdm, lora_request=lora_request)

    # ---- streaming ------------------------------------------------------------------------------

    def stream_outputs(self, prompt: Prompt, params: SamplingParams | None = None,
                       lora_request: LoRARequest | None = None) -> Iterator[RequestOutput]:
        """Yield a RequestOutput each time the request advances (`.outputs[0].delta_text` is new text).
        Closing the iterator early (or Ctrl-C) aborts the request and frees its KV blocks."""
        self._load_lora(lora_request)
        seq = self.engine.add_request(prompt, params, lora_request=lora_request)
        try:
            while not seq.finished:
                for out in self.engine.step():
                    if out.request_id == seq.request_id:
                        yield out
        finally:
            self.engine.abort_request(seq.request_id)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               lora_request: LoRARequest | None = None) -> Iterator[str]:
        """Yield text deltas as they are generated."""
        for out in self.stream_outputs(prompt, params, lora_request):
            if out.outputs[0].delta_text:
                yield out.outputs[0].delta_text

    def stream_chat(self, messages: list[Message], params: SamplingParams | None = None,
                    tools: list[dict] | None = None, chat_template_kwargs: dict[str, Any] | None = None,
                    lora_request: LoRARequest | None = None) -> Iterator[str]:
        return self.stream(self.chat_prompt(messages, tools, True, chat_template_kwargs), params, lora_request)

    def chat_prompt(self, messages: list[Message], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True,
                     kwargs: dict[str, Any] | None = None) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template."""
        return self.engine.tokenizer.apply_chat_template(  # type: ignore[return-value]
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, tools=tools, **(kwargs or {}))


    def _load_lora(self, request: LoRARequest | None) -> None:
        """An adapter is loaded from its path the first time a request names it (as vLLM's LLM does)."""
        if request is None:
            return
        engine = self.engine
        loaded = engine.loras.get(request.lora_name) if engine.loras else None
        if loaded is None:
            engine.add_lora(request)
        elif loaded.request.lora_path != request.lora_path:
            raise LoRAError(f"an adapter named {request.lora_name!r} is already loaded from "
                            f"{loaded.request.lora_path}, not {request.lora_path}")


def _as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items: list[Any] = list(prompts)
    if items and all(isinstance(p, int) for p in items):
        return [items]  # one prompt given as token ids
    return items
