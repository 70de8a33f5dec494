"""`sugam plan`: will a model fit in this much memory, at which quantization, context and concurrency?

Memory = weights (parameters × bits per weight of the format) + KV cache (bytes per token × context ×
concurrent sequences) + runtime (PyTorch and the tokenizer, plus the activations of one batch).
The runtime constants were measured on sugam itself (tests/test_plan.py checks the prediction
against the RSS of a running model).

Speed: decode reads every weight a token uses once per token, so it runs at about
DECODE_EFFICIENCY × memory bandwidth ÷ bytes read per token. A mixture of experts holds all its
experts in memory but reads only the routed ones: memory follows the total parameters, speed the
active ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import ModelConfig
from .errors import SugamError

if TYPE_CHECKING:
    from .loader.gguf import GGUFFile

# Fitted to sugam's steady RSS after loading and generating (smollm2-135m: 362 MB beyond weights and
# KV; qwen2.5-coder-0.5b: 413 MB), then the activations of a full batch added on top, so the
# prediction errs on the safe side (+4 % and +6 % on those two models).
RUNTIME_BASE = 300 * 2**20     # PyTorch, Python and sugam loaded
TOKENIZER_PER_TOKEN = 512      # bytes of tokenizer state per vocabulary entry
BATCH_TOKENS = 2048            # max_num_batched_tokens: the activations of one step
# Share of the machine's bandwidth sugam's decode achieves: 80-83 % measured on the 0.5B and 1.5B
# (docs/QUANTIZATION.md); 0.7 leaves room for KV reads and per-token overhead.
DECODE_EFFICIENCY = 0.7


@dataclass(frozen=True)
class WeightFormat:
    name: str
    bits: float                # average bits per weight, scales included
    runs_today: bool           # whether sugam keeps weights in this format in memory yet
    note: str


FORMATS = (
    WeightFormat("bf16", 16.0, True, "dense bf16 (--quantization none)"),
    WeightFormat("int8", 8.0, True, "int8 weights, one bf16 scale per row (--quantization int8)"),
    WeightFormat("int4", 5.0, True, "int4 weights, bf16 scale and zero per 32 (--quantization int4)"),
    WeightFormat("q4_k_m", 4.85, False, "llama.cpp's Q4_K_M average"),
)


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on; read from a config or written down for well-known models."""
    name: str
    params: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    kv_elements_per_token_layer: int   # K+V elements one token stores in one layer
    context_length: int
    gguf_weight_bytes: int | None = None  # a local GGUF: bytes in memory when kept in its own precision
    kv_vector_size: int = 128          # elements per cached vector (head_dim); an int8 cache adds a scale to each
    active_params: int | None = None   # a mixture of experts: parameters one token uses (None: all of them)
    tied_embeddings: bool = True       # an untied input embedding is read one row a token

    @classmethod
    def from_config(cls, name: str, cfg: ModelConfig) -> ModelShape:
        total, active = model_params(cfg)
        return cls(name, total, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size,
                   cfg.num_hidden_layers, 2 * cfg.num_key_value_heads * cfg.head_dim, cfg.context_length,
                   kv_vector_size=cfg.head_dim, active_params=active if cfg.is_moe else None,
                   tied_embeddings=cfg.tie_word_embeddings)

    @property
    def read_per_token(self) -> int:
        """Parameters decode reads for one token: the active ones, less an untied embedding (one row)."""
        used = self.active_params or self.params
        return used - (0 if self.tied_embeddings else self.vocab_size * self.hidden_size)


def dense_params(cfg: ModelConfig) -> int:
    return model_params(cfg)[0]


def model_params(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, those one token uses): equal for a dense model; a mixture of experts counts
    every expert in the first, the routed ones (and shared experts, routers) in the second."""
    h, d, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if cfg.qkv_bias else 0) + (2 * d if cfg.qk_norm else 0)
    mlp = 3 * h * cfg.intermediate_size
    embeddings = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    dense_layers = sum(not cfg.sparse_layer(i) for i in range(L))
    base = embeddings + L * (attn + 2 * h) + dense_layers * mlp + h
    experts, active = cfg.expert_params()
    return base + experts, base + active


def _qwen(name: str, h: int, layers: int, heads: int, kv: int, inter: int, vocab: int, tied: bool, ctx: int,
          head_dim: int | None = None, qwen3: bool = False, experts: tuple[int, int, int] | None = None) -> ModelShape:
    """experts: (experts, routed per token, expert width) of a Qwen3-MoE whose every layer is sparse."""
    moe: dict[str, Any] = dict(zip(("num_experts", "num_experts_per_tok", "moe_intermediate_size"), experts or ()))
    arch = ("qwen3" if qwen3 else "qwen2") + ("_moe" if experts else "")
    cfg = ModelConfig(architecture=arch, vocab_size=vocab, hidden_size=h,
                      intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, head_dim=head_dim or h // heads, max_position_embeddings=ctx,
                      tie_word_embeddings=tied, qkv_bias=not qwen3, qk_norm=qwen3, norm_topk_prob=bool(experts),
                      **moe)
    return ModelShape.from_config(name, cfg)


# Well-known models, from their published config.json files.
KNOWN: dict[str, ModelShape] = {m.name: m for m in (
    _qwen("qwen2.5-0.5b", 896, 24, 14, 2, 4864, 151936, True, 32768),
    _qwen("qwen2.5-1.5b", 1536, 28, 12, 2, 8960, 151936, True, 32768),
    _qwen("qwen2.5-3b", 2048, 36, 16, 2, 11008, 151936, True, 32768),
    _qwen("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, False, 131072),
    _qwen("qwen2.5-14b", 5120, 48, 40, 8, 13824, 152064, False, 131072),
    _qwen("qwen2.5-32b", 5120, 64, 40, 8, 27648, 152064, False, 131072),
    _qwen("qwen2.5-72b", 8192, 80, 64, 8, 29568, 152064, False, 131072),
    _qwen("qwq-32b", 5120, 64, 40, 8, 27648, 152064, False, 131072),
    _qwen("deepseek-r1-distill-qwen-32b", 5120, 64, 40, 8, 27648, 152064, False, 131072),
    _qwen("deepseek-r1-distill-qwen-7b", 3584, 28, 28, 4, 18944, 152064, False, 131072),
    _qwen("qwen3-0.6b", 1024, 28, 16, 8, 3072, 151936, True, 40960, 128, True),
    _qwen("qwen3-1.7b", 2048, 28, 16, 8, 6144, 151936, True, 40960, 128, True),
    _qwen("qwen3-4b", 2560, 36, 32, 8, 9728, 151936, True, 40960, 128, True),
    _qwen("qwen3-8b", 4096, 36, 32, 8, 12288, 151936, False, 40960, 128, True),
    _qwen("qwen3-14b", 5120, 40, 40, 8, 17408, 151936, False, 40960, 128, True),
    _qwen("qwen3-32b", 5120, 64, 64, 8, 25600, 151936, False, 40960, 128, True),
    # Qwen3-30B-A3B: 128 experts of width 768 in each of 48 layers, 8 routed per token.
    _qwen("qwen3-30b-a3b", 2048, 48, 32, 4, 6144, 151936, False, 40960, 128, True, experts=(128, 8, 768)),
    # A mixture of experts with multi-head latent attention: 671B parameters in all, and a KV cache
    # of one 512-wide latent plus a 64-wide rotary key per token and layer.
    ModelShape("deepseek-r1", 671_000_000_000, 129280, 7168, 18432, 61, 512 + 64, 163840, kv_vector_size=512 + 64),
)}


@dataclass
class PlanRow:
    format: WeightFormat
    weights: int
    kv_cache: int
    runtime: int
    memory: int | None

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.runtime

    @property
    def fits(self) -> bool | None:
        return None if self.memory is None else self.total <= self.memory


def cache_element_bytes() -> int:
    """Bytes of a KV cache element by default on any CPU: bf16, the compute dtype where the CPU has
    bf16 arithmetic, and the storage beside fp32 compute elsewhere (sugam/llm.py load_engine)."""
    return 2


def kv_bytes_per_token(shape: ModelShape, int8: bool = False, element_bytes: int = 2) -> int:
    """element_bytes a cache element (2: bf16, 4: fp32); int8 (--kv-cache-dtype int8): 1 byte plus a
    float32 scale per vector."""
    elements = shape.kv_elements_per_token_layer
    per_layer = elements + elements // shape.kv_vector_size * 4 if int8 else elements * element_bytes
    return shape.num_layers * per_layer


def runtime_bytes(shape: ModelShape) -> int:
    activations = BATCH_TOKENS * (6 * shape.hidden_size + 2 * shape.intermediate_size) * 4
    return RUNTIME_BASE + shape.vocab_size * TOKENIZER_PER_TOKEN + activations


def plan(shape: ModelShape, context: int, concurrency: int, memory: int | None,
         kv_int8: bool = False, tensor_parallel_size: int = 1, kv_element_bytes: int | None = None) -> list[PlanRow]:
    """Memory per device. With tensor parallelism (distributed/sharding.py) each rank holds 1/N of
    every layer and of the KV cache, the embedding whole, and rank 0 the LM head too: the rows are
    rank 0's, the largest share. kv_element_bytes: by default this CPU's (cache_element_bytes)."""
    n = tensor_parallel_size
    kv_heads = shape.kv_elements_per_token_layer // (2 * shape.kv_vector_size)
    if n < 1 or kv_heads % n:
        raise SugamError(f"--tensor-parallel-size {n} must divide the model's {kv_heads} key/value heads")
    element = kv_element_bytes or cache_element_bytes()
    kv = kv_bytes_per_token(shape, kv_int8, element) * context * concurrency // n

    def per_rank(total: int, bits: float) -> int:
        embeddings = min(total, int(shape.vocab_size * shape.hidden_size * bits / 8) * 2)  # embedding + head
        return (total - embeddings) // n + embeddings

    rows = [PlanRow(f, per_rank(int(shape.params * f.bits / 8), f.bits), kv, runtime_bytes(shape), memory)
            for f in FORMATS]
    if shape.gguf_weight_bytes:
        own = WeightFormat("gguf", shape.gguf_weight_bytes * 8 / shape.params, True,
                           "the file's own precision, as sugam keeps it (the default on CPU)")
        rows.insert(0, PlanRow(own, per_rank(shape.gguf_weight_bytes, own.bits), kv, runtime_bytes(shape), memory))
    return rows


def gguf_weight_bytes(gguf: GGUFFile, tied_embeddings: bool) -> int:
    """Bytes sugam's default (--quantization gguf) keeps in memory for this file's tensors."""
    from . import native
    from .loader.gguf import hf_name
    from .quant.formats import stored_bytes
    from .quant.gguf_pack import packed_row_bytes
    from .quant.policy import weight_chooser

    # sugam's own CPU kernels keep the file's blocks; whether they run is a property of this CPU
    choose = weight_chooser("gguf", tied_embeddings, packed_kernels=native.cpu_supported())
    total = 0
    for name, tensor in gguf.tensors.items():
        target = hf_name(name)
        if target is None:
            continue
        # an MoE layer's 3-D expert tensor is loaded as one matrix per expert
        count, shape = (tensor.shape[0], tensor.shape[1:]) if len(tensor.shape) == 3 else (1, tensor.shape)
        fmt = choose(target, shape, tensor.qtype.name)  # type: ignore[misc]  # "gguf" always has a chooser
        if fmt == "rows":
            total += tensor.raw.nbytes
        elif fmt == "packed":
            total += count * shape[0] * packed_row_bytes(tensor.qtype.name, shape[1])
        elif fmt in ("int4", "int8"):
            total += count * stored_bytes(fmt, shape)  # type: ignore[arg-type]  # int4/int8 only for matrices
        else:
            total += math.prod(tensor.shape) * 2  # dense bf16
    return total


def resolve_shape(model: str) -> ModelShape:
    """A built-in name, an alias or a local file/folder (only its header or config.json is read)."""
    import json

    from .registry import resolve

    key = model.lower().removeprefix("hf:").split("/")[-1].removesuffix("-instruct")
    if key in KNOWN:
        return KNOWN[key]
    from .errors import ModelNotFoundError

    try:
        path = resolve(model, download=False)
    except ModelNotFoundError:
        # Not downloaded: a coder model has the shape of its base model.
        if key.replace("-coder", "") in KNOWN:
            return KNOWN[key.replace("-coder", "")]
        raise
    if path.is_file():
        from dataclasses import replace

        from .loader.gguf import GGUFFile, open_gguf

        gguf = GGUFFile(path)
        config = open_gguf(path, gguf).config
        shape = ModelShape.from_config(path.stem, config)
        return replace(shape, gguf_weight_bytes=gguf_weight_bytes(gguf, config.tie_word_embeddings))
    return ModelShape.from_config(path.name, ModelConfig.from_hf(json.loads((path / "config.json").read_text())))


def decode_speed(shape: ModelShape, row: PlanRow, bandwidth: float) -> tuple[float, float]:
    """(bytes read per token, expected decode tok/s) for a row's format at `bandwidth` bytes/s."""
    per_token = row.weights / shape.params * shape.read_per_token
    return per_token, DECODE_EFFICIENCY * bandwidth / per_token


def measure_bandwidth(seconds: float = 0.3) -> float:
    """Bytes/s this machine streams (a torch sum over 512 MiB, best of a few; all threads)."""
    import time

    import torch

    x = torch.ones(2**27, dtype=torch.float32)
    x.sum()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t))
    return best


def format_plan(shape: ModelShape, rows: list[PlanRow], context: int, concurrency: int,
                kv_int8: bool = False, tensor_parallel_size: int = 1, kv_element_bytes: int | None = None,
                bandwidth: float | None = None) -> str:
    """`bandwidth`: bytes/s of memory, for the expected decode speed (None: not shown)."""
    gb = 1e9
    element = kv_element_bytes or cache_element_bytes()
    kv_format = "int8" if kv_int8 else "bf16" if element == 2 else "fp32"
    active = (f" ({shape.active_params / 1e9:.2f}B active per token: all experts are held, the routed ones read)"
              if shape.active_params else "")
    lines = [f"{shape.name}: {shape.params / 1e9:.2f}B parameters{active}, KV cache "
             f"{kv_bytes_per_token(shape, kv_int8, element) / 1024:.0f} KiB per token ({kv_format}), "
             f"context {context} x {concurrency} sequence(s)"]
    if tensor_parallel_size > 1:
        lines.append(f"per device, tensor parallel over {tensor_parallel_size}: 1/{tensor_parallel_size} of every "
                     "layer and of the KV cache, the embedding and (rank 0) the LM head whole")
    memory = rows[0].memory
    header = f"{'format':8s} {'weights':>9s} {'KV cache':>9s} {'runtime':>8s} {'total':>9s}"
    if memory is not None:
        header += f"  fits in {memory / gb:.0f} GB"
    lines += ["", header]
    for r in rows:
        line = (f"{r.format.name:8s} {r.weights / gb:8.2f}G {r.kv_cache / gb:8.2f}G {r.runtime / gb:7.2f}G "
                f"{r.total / gb:8.2f}G")
        if memory is not None:
            line += "  " + ("yes" if r.fits else "no ")
        line += "   (the default)" if r.format.name == "gguf" else ""
        line += "" if r.format.runs_today else "   (llama.cpp's format, for comparison)"
        lines.append(line)
    if memory is not None:
        fitting = [r for r in rows if r.fits]
        if fitting:
            best = max(fitting, key=lambda r: r.format.bits)
            lines += ["", f"highest precision that fits: {best.format.name} ({best.total / gb:.1f} GB of "
                          f"{memory / gb:.0f} GB)"]
            if bandwidth:
                per_token, speed = decode_speed(shape, best, bandwidth)
                lines.append(f"expected decode: ~{speed:.0f} tok/s ({DECODE_EFFICIENCY} x {bandwidth / gb:.0f} GB/s "
                             f"/ {per_token / gb:.2f} GB read per token in {best.format.name})")
        else:
            per_token = kv_bytes_per_token(shape, kv_int8, element)
            smallest = min(rows, key=lambda r: r.total)
            lines += ["", f"does not fit even as {smallest.format.name} ({smallest.total / gb:.1f} GB); "
                          f"the weights alone need {smallest.weights / gb:.1f} GB"]
            room = memory - smallest.weights - smallest.runtime
            if room > per_token:
                lines.append(f"(with {smallest.format.name} weights, {room // per_token} tokens of KV cache would fit)")
    return "\n".join(lines)
