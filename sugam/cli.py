"""The `sugam` command: pull, models, run, chat, serve, perplexity, plan, quantize, finetune, export."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

from .errors import SugamError
from .registry import DEFAULT_MODEL

EPILOG = "MODEL is an alias (see `sugam models --known`), a .gguf file, an HF folder, or hf:ORG/NAME."


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model to run (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="torch device: cpu (default), cuda, cuda:1, mps, ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CPU/CUDA, fp16 on MPS), float32, bfloat16, float16")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model (default: one per core this process may use)")
    _add_quantization_arg(p)


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tensor parallelism (docs/DISTRIBUTED.md)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split every layer over N processes on this machine (gloo on CPUs, NCCL on CUDA); "
                        "under torchrun (python -m sugam.serve) the group's size")
    g.add_argument("--cpus-per-rank", type=int, default=None, metavar="K",
                   help="CPU threads per rank, each rank pinned to its own CPUs (default: an equal share)")
    g.add_argument("--distributed-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long a rank may be waited for before the server gives up (503, exit 1)")


def _add_quantization_arg(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--quantization", default=default, choices=["auto", "none", "gguf", "int8", "int4"],
                   help="weights in memory: auto (a GGUF keeps its precision on CPU in bf16; else dense), "
                        "none (dense, model dtype), gguf, int8, int4 (see docs/QUANTIZATION.md)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bf16", "int8"],
                   help="KV cache storage: auto (the model dtype), bf16 (half of fp32's bytes, for CPUs that "
                        "compute in fp32) or int8 (about half of bf16's)")


def _add_speculative_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", default=None, metavar="ngram|MODEL",
                   help="speculative decoding: ngram (prompt lookup) or a draft model with the same vocabulary "
                        "(see docs/SPECULATIVE.md)")
    p.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="tokens guessed per step (default 5 for ngram, 4 for a draft model)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='vLLM\'s form, e.g. \'{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}\'')


def _speculative(args: argparse.Namespace) -> Any:
    from .engine.speculative import SpeculativeConfig

    if not hasattr(args, "speculative"):  # a command without the options (perplexity)
        return None
    if args.speculative and args.speculative_config:
        raise SugamError("give --speculative or --speculative-config, not both")
    spec = args.speculative_config or args.speculative
    if spec is None and args.num_speculative_tokens is not None:
        raise SugamError("--num-speculative-tokens needs --speculative ngram|MODEL")
    return SpeculativeConfig.parse(spec, args.num_speculative_tokens)


def _add_lora_arg(p: argparse.ArgumentParser) -> None:
    """run and chat: answer with one LoRA adapter."""
    p.add_argument("--lora", default=None, metavar="PATH",
                   help="answer with a LoRA adapter: a PEFT folder or a llama.cpp GGUF LoRA file")
    p.add_argument("--max-lora-rank", type=int, default=None,
                   help="refuse an adapter of a higher rank (default: accept the adapter's own rank)")


def _add_serve_lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve a LoRA adapter (PEFT folder or GGUF LoRA file) as model NAME; repeat for more; "
                        "implies --enable-lora")
    p.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (none needed at start)")
    p.add_argument("--max-loras", type=int, default=4, help="LoRA adapters in one batch (default 4)")
    p.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank accepted (default 16)")
    p.add_argument("--allow-runtime-lora", action="store_true",
                   default=os.environ.get("SUGAM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true", "yes"),
                   help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter, which load adapter files "
                        "from this machine's disk (default: $SUGAM_ALLOW_RUNTIME_LORA_UPDATING, else off)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens to generate at most (default 1024)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="same seed, same output")
    p.add_argument("--system", default=None, help="system prompt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sugam", description="Run Qwen-family models fast on your own hardware.",
                                     epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="download a model into the cache (sha256-checked)", epilog=EPILOG)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)

    p = sub.add_parser("models", help="list downloaded models (--known: every alias)")
    p.add_argument("--known", action="store_true", help="list the aliases sugam can fetch")

    p = sub.add_parser("run", help="generate one answer, streamed to the terminal", epilog=EPILOG)
    _add_model_args(p)
    p.add_argument("prompt", help="the prompt (use - to read it from standard input)")
    _add_sampling_args(p)
    _add_speculative_args(p)
    _add_lora_arg(p)
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, ...)",
                       epilog=EPILOG)
    _add_model_args(p)
    _add_speculative_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("SUGAM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $SUGAM_API_KEY; none = open)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the alias or file name)")
    p.add_argument("--kv-cache-memory", default=None, help="KV pool size, e.g. 2GB or 512MB (default: 1/4 of free memory)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences generated at once (default 64)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="never share KV blocks between requests with a common prompt prefix (benchmarks)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="a request's tokens never depend on the others running with it (quantized weights on a "
                        "CPU; prompts take a few %% longer, docs/BATCH_INVARIANCE.md)")
    p.add_argument("--max-waiting", type=int, default=256, help="queued sequences before new requests get 429")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="largest request body (default 4 MiB)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is stopped")
    p.add_argument("--no-webui", action="store_true", help="no chat page at / (it then answers only the Ollama probe)")
    _add_serve_lora_args(p)
    _add_parallel_args(p)

    p = sub.add_parser("perplexity", help="perplexity of a model over a text file (a quality check)", epilog=EPILOG)
    _add_model_args(p)
    p.add_argument("file", help="a UTF-8 text file")
    p.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=int, default=None, help="tokens a window advances (default context/2)")
    p.add_argument("--chunk", type=int, default=None,
                   help="compute each window this many tokens at a time, later ones reading the KV cache "
                        "(to measure --kv-cache-dtype; default: the whole window at once)")

    p = sub.add_parser("plan", help="will it fit? memory for each quantization, context and concurrency",
                       epilog=EPILOG + " Also a built-in name: " + ", ".join(sorted(_known_plan_names())) + ".")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--memory", default=None, help="memory to fit in, e.g. 16GB (default: this machine's)")
    p.add_argument("--context", type=int, default=None, help="tokens per sequence (default: min(model's, 8192))")
    p.add_argument("--concurrency", type=int, default=1, help="sequences held at once (default 1)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bf16", "int8"],
                   help="KV cache storage (default: this CPU's compute dtype, bf16 or fp32)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split over N devices: --memory is then per device")
    p.add_argument("--bandwidth", type=float, default=None, metavar="GB/s",
                   help="memory bandwidth for the expected decode speed (default: measured here, ~0.3 s)")

    p = sub.add_parser("quantize", help="write an HF model's weights as int8/int4, in a folder that loads fast",
                       epilog=EPILOG)
    p.add_argument("model", help="an HF folder or hf:ORG/NAME (safetensors)")
    p.add_argument("output", help="folder to write (config, tokenizer and model.safetensors)")
    p.add_argument("--quantization", default="int4", choices=["int8", "int4"], help="weight format (default int4)")

    p = sub.add_parser("export", help="write a LoRA adapter in llama.cpp's GGUF LoRA format")
    p.add_argument("adapter", help="a PEFT adapter folder (sugam finetune's output, or peft's)")
    p.add_argument("--gguf", required=True, metavar="FILE", help="the .gguf file to write")
    p.add_argument("--model", help="its base model (alias, .gguf, HF folder; default: the adapter's base_model_name_or_path)")

    p = sub.add_parser("chat", help="interactive multi-turn chat (/reset, /exit; Ctrl-C stops an answer)",
                       epilog=EPILOG)
    _add_model_args(p)
    _add_sampling_args(p)
    _add_speculative_args(p)
    _add_lora_arg(p)

    p = sub.add_parser("finetune", help="train a LoRA adapter on your data (CPU or GPU; see docs/CUSTOMIZE.md)",
                       epilog=EPILOG + " DATA is a .jsonl file of {\"messages\": [...]}, {\"prompt\", \"completion\"} "
                       "or {\"text\"} lines, or a folder with train.jsonl and valid.jsonl.")
    _add_finetune_args(p)
    return parser


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the base model (alias, .gguf, HF folder or hf:ORG/NAME)")
    p.add_argument("data", help="training data: a .jsonl file or a folder with train.jsonl (+ valid.jsonl)")
    p.add_argument("--output", "-o", required=True, help="folder for the adapter (PEFT format) and checkpoints")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto",
                   help="compute dtype: auto (bf16 where native, else float32), bfloat16, float32")
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "gguf", "int8", "int4"],
                   help="base weights in memory, as for `sugam run` (auto: a GGUF stays quantized on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; updates are scaled by alpha/r (default 16)")
    g.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA input (default 0.05)")
    g.add_argument("--target-modules", default="all",
                   help="projections to adapt: all (default), attention, mlp, or a list like q,k,v,o,gate,up,down")
    g = p.add_argument_group("training")
    g.add_argument("--learning-rate", "--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    g.add_argument("--lr-schedule", default="cosine", choices=["cosine", "linear", "constant"],
                   help="decay after the warmup (default cosine)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default 5%% of the steps, <= 100)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = none (default 1.0)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the training data (default 1)")
    g.add_argument("--iters", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=1, help="examples per micro-batch (default 1)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--max-seq-len", type=int, default=2048, help="examples are cut to this many tokens (default 2048)")
    g.add_argument("--seed", type=int, default=0, help="seed for the data order, split, init and dropout (default 0)")
    g.add_argument("--valid-fraction", type=float, default=0.1,
                   help="share of a single data file held out for validation (default 0.1)")
    g.add_argument("--train-on-prompt", action="store_true", help="put the loss on prompt tokens too")
    g.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="keep every layer's activations (faster, more memory)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=100, help="validation loss every N steps and at the end (0: end only)")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps into OUTPUT/checkpoint-N (0: none)")
    g.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in OUTPUT, or from the CHECKPOINT folder given")
    g.add_argument("--overwrite", action="store_true", help="allow an OUTPUT that already holds a fine-tune")


def _sampling(args: argparse.Namespace) -> Any:
    from .sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed)


def _load(args: argparse.Namespace) -> Any:
    from .engine.runner import describe_path
    from .llm import LLM

    start = time.perf_counter()
    lora = _read_lora(args)  # before the model, so that a wrong path fails at once
    rank = getattr(args, "max_lora_rank", None)
    if rank is None:
        rank = lora[1].max_rank if lora else 16
    # One conversation at a time: a KV pool of one context, not one sized for a server.
    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, max_num_seqs=1,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
              speculative_config=_speculative(args), enable_lora=lora is not None, max_loras=1,
              max_lora_rank=rank)
    with_lora = ""
    if lora is not None:
        request, adapter = lora
        llm.engine.add_lora(request, adapter)  # checks it fits the model: LoRAError with the reason
        with_lora = f", LoRA {request.lora_name} (rank {adapter.max_rank})"
    print(f"[loaded {llm.model_path.name}{with_lora} in {time.perf_counter() - start:.1f} s: "
          f"{describe_path(llm.engine.runner.execution_path())}]", file=sys.stderr)
    return llm


def _adapter_name(path: str) -> str:
    """A LoRA adapter's default name: its folder's name, or its file's stem."""
    from pathlib import Path

    p = Path(path).expanduser().resolve()
    if p.name in ("adapter_config.json", "adapter_model.safetensors"):
        p = p.parent
    return p.stem if p.suffix == ".gguf" else p.name


def _read_lora(args: argparse.Namespace) -> Any:
    """run / chat --lora PATH: (LoRARequest, LoRAAdapter), or None."""
    if getattr(args, "lora", None) is None:  # not given, or a command without the option (perplexity)
        return None
    from .lora.adapter import LoRARequest, load_adapter

    return LoRARequest(_adapter_name(args.lora), 1, args.lora), load_adapter(args.lora)


def _lora_request(llm: Any) -> Any:
    """The adapter run / chat loaded with --lora (at most one), or None."""
    loras = llm.engine.list_loras()
    return loras[0] if loras else None


def _stream_answer(llm: Any, prompt_ids: list[int], params: Any) -> tuple[str, str]:
    """Print the answer as it comes; return (text, finish reason). Ctrl-C stops it cleanly."""
    start = time.perf_counter()
    first = None
    text, tokens, reason = [], 0, "interrupted"
    spec = llm.engine.speculator
    drafted, accepted = (spec.stats.num_draft_tokens, spec.stats.num_accepted_tokens) if spec else (0, 0)
    try:
        for out in llm.stream_outputs(prompt_ids, params, _lora_request(llm)):
            completion = out.outputs[0]
            if first is None:
                first = time.perf_counter()
            tokens = len(completion.token_ids)
            if completion.delta_text:
                sys.stdout.write(completion.delta_text)
                sys.stdout.flush()
                text.append(completion.delta_text)
            if out.finished:
                reason = completion.finish_reason or "stop"
    except KeyboardInterrupt:
        pass
    end = time.perf_counter()
    sys.stdout.write("\n")
    if first is not None:
        decode = (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0
        guesses = ""
        if spec:
            drafted, accepted = spec.stats.num_draft_tokens - drafted, spec.stats.num_accepted_tokens - accepted
            guesses = f"; guesses accepted {accepted}/{drafted}" + (f" ({accepted / drafted:.0%})" if drafted else "")
        print(f"[{len(prompt_ids)} prompt tokens, first token {first - start:.2f} s; {tokens} tokens, "
              f"decode {decode:.1f} tok/s{guesses}; finish: {reason}]", file=sys.stderr)
    return "".join(text), reason


def cmd_pull(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .registry import lookup_alias, pull

    path = pull(args.model)
    if lookup_alias(args.model) is None and Path(args.model).expanduser().exists():
        print(f"{path} is already on this machine; nothing to download", file=sys.stderr)
    print(path)


def cmd_models(args: argparse.Namespace) -> None:
    from .registry import MODELS, is_cached, list_cached, models_dir

    if args.known:
        for alias, source in MODELS.items():
            mark = "*" if is_cached(source) else " "
            print(f"{mark} {alias:32s} {source.size / 1e6:8.0f} MB  {source.description}")
        print("(* = downloaded)")
        return
    rows = list_cached()
    if not rows:
        print(f"no models in {models_dir()}; fetch one with `sugam pull {DEFAULT_MODEL}`")
    for name, path, size in rows:
        print(f"{name:32s} {size / 1e6:8.0f} MB  {path}")


def cmd_run(args: argparse.Namespace) -> None:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = _load(args)
    tok = llm.get_tokenizer()
    if args.raw:
        prompt_ids = tok.encode(prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        prompt_ids = llm.chat_prompt(messages)
    _stream_answer(llm, prompt_ids, _sampling(args))


def cmd_chat(args: argparse.Namespace) -> None:
    llm = _load(args)
    params = _sampling(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(system)
    print("Type a message. /reset clears the conversation, /exit (or Ctrl-D) quits; "
          "Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D to quit)", file=sys.stderr)
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit", "/bye"):
            return
        if command == "/reset":
            history = list(system)
            print("[conversation cleared]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        try:
            prompt_ids = llm.chat_prompt(history)
        except SugamError as exc:  # e.g. the conversation outgrew the context
            history.pop()
            print(f"error: {exc}", file=sys.stderr)
            continue
        try:
            text, _ = _stream_answer(llm, prompt_ids, params)
        except SugamError as exc:
            history.pop()
            print(f"error: {exc}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": text})


def parse_size(text: str | None) -> int | None:
    """'2GB', '512MiB', '1e9' -> bytes."""
    if text is None:
        return None
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    t = text.strip().lower().removesuffix("b")
    for suffix in sorted(units, key=len, reverse=True):
        if t.endswith(suffix):
            return int(float(t[:-len(suffix)]) * units[suffix])
    try:
        return int(float(t))
    except ValueError:
        raise SugamError(f"cannot read the size {text!r}; write e.g. 2GB or 512MiB") from None


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from .engine.llm_engine import EngineConfig, LLMEngine
    from .llm import load_engine
    from .registry import lookup_alias, resolve
    from .serve.app import ServerConfig, create_app

    path = resolve(args.model)  # fetch before serving, so that errors show here
    source = lookup_alias(args.model)
    name = args.served_model_name or (source.alias if source else path.stem if path.is_file() else path.name)
    loras = _serve_loras(args, name, path)  # read and checked before serving, so that errors show here
    enable_lora = args.enable_lora or bool(loras)
    engine_config = EngineConfig(max_model_len=args.max_model_len, kv_cache_memory=parse_size(args.kv_cache_memory),
                                 max_num_seqs=args.max_num_seqs, quantization=args.quantization,
                                 kv_cache_dtype=args.kv_cache_dtype, enable_prefix_caching=not args.no_prefix_caching,
                                 speculative=_speculative(args), enable_lora=enable_lora, max_loras=args.max_loras,
                                 max_lora_rank=args.max_lora_rank, tensor_parallel_size=args.tensor_parallel_size,
                                 cpus_per_rank=args.cpus_per_rank, distributed_timeout=args.distributed_timeout,
                                 batch_invariant=args.batch_invariant)
    if args.tensor_parallel_size < 1:
        raise SugamError("--tensor-parallel-size must be at least 1")

    def load() -> LLMEngine:
        engine = load_engine(path, args.dtype, args.device, engine_config)
        for request, adapter in loras:
            engine.add_lora(request, adapter)
        return engine

    config = ServerConfig(model_name=name, api_key=args.api_key or None, max_waiting=args.max_waiting,
                          max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout,
                          model_path=str(path), allow_runtime_lora=args.allow_runtime_lora,
                          webui=not args.no_webui)
    print(f"sugam: serving {name} on http://{args.host}:{args.port}/v1 (loading; /health says when ready)",
          file=sys.stderr)
    for request, adapter in loras:
        print(f"sugam: LoRA adapter {request.lora_name} (rank {adapter.max_rank}) from {request.lora_path}",
              file=sys.stderr)
    if args.allow_runtime_lora and not enable_lora:
        print("sugam: note: --allow-runtime-lora needs --enable-lora (or --lora) to load adapters", file=sys.stderr)
    uvicorn.run(create_app(config, load), host=args.host, port=args.port, log_level="warning")


def _serve_loras(args: argparse.Namespace, base_name: str, model_path: Any) -> list[Any]:
    """serve --lora NAME=PATH ...: [(LoRARequest, LoRAAdapter)] with ids 1, 2, ... in order, each
    read and checked against the model's config (LoRAError naming the flag otherwise)."""
    from pathlib import Path

    from .loader import open_checkpoint
    from .lora.adapter import LoRAError, LoRARequest, load_adapter

    if args.max_loras < 1 or args.max_lora_rank < 1:
        raise SugamError("--max-loras and --max-lora-rank must be at least 1")
    if not args.lora:
        return []
    config = open_checkpoint(model_path).config  # the config and tokenizer only, not the weights
    loras, names = [], set()
    for lora_id, spec in enumerate(args.lora, 1):
        name, sep, lora_path = spec.partition("=")
        if not sep or Path(spec).expanduser().exists():  # a bare PATH: named after its folder or file
            name, lora_path = _adapter_name(spec), spec
        if not name or not lora_path:
            raise SugamError(f"--lora {spec!r}: write NAME=PATH")
        if name == base_name:
            raise SugamError(f"--lora {spec}: {name!r} is the served model's name; give the adapter another")
        if name in names:
            raise SugamError(f"--lora {spec}: the name {name!r} is given twice")
        names.add(name)
        adapter = load_adapter(lora_path)
        try:
            adapter.validate(config, args.max_lora_rank)
        except LoRAError as exc:
            raise LoRAError(f"--lora {spec}: {exc}") from exc
        loras.append((LoRARequest(name, lora_id, str(Path(lora_path).expanduser().resolve())), adapter))
    return loras


def cmd_perplexity(args: argparse.Namespace) -> None:
    from pathlib import Path

    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SugamError(f"cannot read {args.file}: {exc}") from exc
    llm = _load(args)
    start = time.perf_counter()
    result = llm.perplexity(text, context=args.context, stride=args.stride, chunk=args.chunk)
    elapsed = time.perf_counter() - start
    print(f"{result.tokens_scored} tokens in {result.windows} windows of {args.context}: "
          f"mean NLL {result.mean_nll:.4f}, perplexity {result.perplexity:.4f} "
          f"({result.tokens_scored / elapsed:.0f} tok/s)")


def cmd_quantize(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .loader import open_checkpoint
    from .quant.export import save_quantized
    from .registry import resolve

    start = time.perf_counter()
    source = resolve(args.model)
    written = save_quantized(open_checkpoint(source), Path(args.output), args.quantization)
    print(f"wrote {args.output}/model.safetensors ({written / 1e6:.1f} MB, {args.quantization}) "
          f"in {time.perf_counter() - start:.1f} s; run it with: sugam run {args.output} \"PROMPT\"")


def cmd_export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .loader import open_checkpoint
    from .lora.adapter import load_peft, save_gguf_lora
    from .registry import resolve

    adapter = load_peft(Path(args.adapter))
    base = args.model or adapter.base_model
    if not base:
        raise SugamError("the adapter does not name its base model; give it with --model")
    config = open_checkpoint(resolve(base)).config
    adapter.validate(config)
    save_gguf_lora(adapter, Path(args.gguf), config)
    print(f"wrote {args.gguf} ({Path(args.gguf).stat().st_size / 1e6:.1f} MB, rank {adapter.max_rank}, "
          f"{len(adapter.weights)} matrices, for {config.architecture}); serve it with: "
          f"sugam serve {base} --lora NAME={args.gguf}")


def _known_plan_names() -> list[str]:
    from .plan import KNOWN
    return list(KNOWN)


def cmd_plan(args: argparse.Namespace) -> None:
    from .plan import format_plan, measure_bandwidth, plan, resolve_shape

    shape = resolve_shape(args.model)
    memory = parse_size(args.memory)
    if memory is None:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    context = args.context or min(shape.context_length, 8192)
    if context <= 0 or args.concurrency <= 0:
        raise SugamError("--context and --concurrency must be positive")
    kv_int8 = args.kv_cache_dtype == "int8"
    element = 2 if args.kv_cache_dtype == "bf16" else None
    tp = args.tensor_parallel_size
    if args.bandwidth is not None and args.bandwidth <= 0:
        raise SugamError("--bandwidth must be positive (GB/s)")
    bandwidth = None if tp > 1 else args.bandwidth * 1e9 if args.bandwidth else measure_bandwidth()
    print(format_plan(shape, plan(shape, context, args.concurrency, memory, kv_int8, tp, element), context,
                      args.concurrency, kv_int8, tp, element, bandwidth))


def cmd_finetune(args: argparse.Namespace) -> None:
    from .lora.finetune import finetune, parse_target_modules

    result = finetune(
        args.model, args.data, args.output, device=args.device, dtype=args.dtype, quantization=args.quantization,
        rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=parse_target_modules(args.target_modules),
        learning_rate=args.learning_rate, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, epochs=args.epochs, iters=args.iters,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_seq_len=args.max_seq_len, seed=args.seed,
        valid_fraction=args.valid_fraction, train_on_prompt=args.train_on_prompt,
        gradient_checkpointing=not args.no_gradient_checkpointing, eval_every=args.eval_every,
        save_every=args.save_every, resume=args.resume, overwrite=args.overwrite)
    print(result.summary())


COMMANDS = {"quantize": cmd_quantize, "perplexity": cmd_perplexity, "plan": cmd_plan, "pull": cmd_pull, "models": cmd_models, "run": cmd_run, "chat": cmd_chat, "serve": cmd_serve, "finetune": cmd_finetune, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "threads", None) is not None:
        if args.threads <= 0:
            print("error: --threads must be positive", file=sys.stderr)
            return 1
        import torch
        torch.set_num_threads(args.threads)
    try:
        COMMANDS[args.command](args)
    except SugamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
