"""A LoRA adapter in memory, and the two file formats people bring one in.

- PEFT (what `peft`, vLLM, axolotl, unsloth and `sugam finetune` write): a folder with
  `adapter_config.json` and `adapter_model.safetensors`, tensors named
  `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` ([rank, in]) and `...lora_B.weight`
  ([out, rank]).
- llama.cpp's GGUF LoRA (convert_lora_to_gguf.py): `general.type = "adapter"`, `adapter.type = "lora"`,
  `adapter.lora.alpha`, tensors `blk.N.attn_q.weight.lora_a` / `.lora_b` with the same matrices. For
  the llama architecture the converter permuted q/k rows (of lora_b) as it does for the base; they
  are put back here as the base loader does.

Nothing here trusts a file: every tensor's module, layer and shape is checked against the model's
config in `validate`, before a single weight reaches the model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import SugamError

# The projections an adapter may target, by their HF module names.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The submodule of a decoder layer each projection lives in (HF naming)
PROJECTION_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_FROM_GGUF = {v: k for k, v in _GGUF_NAMES.items()}
_PEFT_NAME = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
# LoRA on experts, routers or shared experts (PEFT and GGUF names), which sugam does not apply.
_EXPERT_NAME = re.compile(r"\.mlp\.(experts|shared_expert|gate)\.|_exps\.|_shexp\.|\.ffn_gate_inp\.")
_GGUF_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.weight\.lora_([ab])$")
MAX_RANK = 1024     # no sane adapter is wider; a file claiming more is refused before allocating


class LoRAError(SugamError):
    """An adapter that cannot be used with this model (the server answers 400 with the message)."""


@dataclass(frozen=True)
class LoRARequest:
    """Which adapter a request uses, in vLLM's shape: a name (what clients put in `model`), a
    positive integer id, and where its files are."""
    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not self.lora_name or self.lora_int_id < 1:
            raise LoRAError("a LoRA request needs a name and an id of 1 or more")


@dataclass
class LoRAWeights:
    """One projection's low-rank update: W x + scale * B (A x)."""
    a: torch.Tensor          # [rank, in]
    b: torch.Tensor          # [out, rank]
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoRAAdapter:
    weights: dict[tuple[int, str], LoRAWeights]    # (layer, module e.g. "q_proj") -> update
    rank: int
    alpha: float
    base_model: str | None = None
    architecture: str | None = None                # when the file says (GGUF)
    use_rslora: bool = False
    extra_config: dict = field(default_factory=dict)

    @property
    def target_modules(self) -> list[str]:
        return sorted({module for _, module in self.weights}, key=TARGET_MODULES.index)

    @property
    def max_rank(self) -> int:
        return max(w.rank for w in self.weights.values())

    def num_parameters(self) -> int:
        return sum(w.a.numel() + w.b.numel() for w in self.weights.values())

    def validate(self, cfg: ModelConfig, max_rank: int | None = None) -> None:
        """Refuse an adapter that does not fit this model: architecture, layers, shapes, rank."""
        if not self.weights:
            raise LoRAError("the adapter holds no LoRA weights")
        if self.architecture and self.architecture != cfg.architecture:
            raise LoRAError(f"the adapter is for architecture {self.architecture!r}, the model is {cfg.architecture!r}")
        if max_rank is not None and self.max_rank > max_rank:
            raise LoRAError(f"the adapter's rank {self.max_rank} is above the limit --max-lora-rank {max_rank}")
        q, kv, h, f = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim,
                       cfg.hidden_size, cfg.intermediate_size)
        shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                  "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
        for (layer, module), w in sorted(self.weights.items()):
            if not 0 <= layer < cfg.num_hidden_layers:
                raise LoRAError(f"the adapter has weights for layer {layer}; the model has {cfg.num_hidden_layers}")
            if PROJECTION_PARENT[module] == "mlp" and cfg.sparse_layer(layer):
                raise LoRAError(f"layer {layer} {module}: layer {layer} is a mixture-of-experts layer, and sugam "
                                f"applies LoRA to attention projections (and dense MLP layers) only, not to experts")
            out, inp = shapes[module]
            if w.a.dim() != 2 or w.b.dim() != 2 or w.a.shape[1] != inp or w.b.shape[0] != out or w.b.shape[1] != w.rank:
                raise LoRAError(f"layer {layer} {module}: lora_A {tuple(w.a.shape)} and lora_B {tuple(w.b.shape)} do not "
                                f"fit the model's {out}x{inp} matrix (expected [r, {inp}] and [{out}, r])")

    def scaled_b(self, key: tuple[int, str], dtype: torch.dtype) -> torch.Tensor:
        w = self.weights[key]
        return (w.b.float() * w.scale).to(dtype)


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _check_rank(rank: int, where: str) -> None:
    if not 1 <= rank <= MAX_RANK:
        raise LoRAError(f"{where}: rank {rank} (1 to {MAX_RANK})")


# --- PEFT folders ---------------------------------------------------------------------------------

def load_peft(folder: Path) -> LoRAAdapter:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise LoRAError(f"{config_path}: cannot read the adapter config ({exc})") from exc
    if not isinstance(config, dict):
        raise LoRAError(f"{config_path}: not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{config_path}: peft_type {config.get('peft_type')!r}; sugam serves LORA adapters")
    if config.get("bias", "none") != "none":
        raise LoRAError(f"{config_path}: bias {config['bias']!r}; sugam serves adapters with bias 'none'")
    if config.get("use_dora"):
        raise LoRAError(f"{config_path}: DoRA adapters are not supported")
    if config.get("modules_to_save"):
        raise LoRAError(f"{config_path}: modules_to_save {config['modules_to_save']} (fully trained modules) "
                        "are not supported; only LoRA updates of the projections")
    try:
        rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    except (TypeError, ValueError) as exc:
        raise LoRAError(f"{config_path}: r and lora_alpha must be numbers") from exc
    _check_rank(rank, str(config_path))
    rslora = bool(config.get("use_rslora", False))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    weights_path = folder / "adapter_model.safetensors"
    if not weights_path.exists():
        if (folder / "adapter_model.bin").exists():
            raise LoRAError(f"{folder}: adapter_model.bin is a pickle, which sugam never loads; "
                            "convert it to adapter_model.safetensors")
        raise LoRAError(f"{folder}: no adapter_model.safetensors")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoRAError(f"{weights_path}: cannot read ({exc})") from exc

    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if _EXPERT_NAME.search(name):
            raise LoRAError(f"{weights_path}: tensor {name!r} adapts a mixture-of-experts router or expert; sugam "
                            "applies LoRA to attention projections (and dense MLP layers) only")
        match = _PEFT_NAME.match(name)
        if match is None or match.group(3) not in TARGET_MODULES or PROJECTION_PARENT[match.group(3)] != match.group(2):
            raise LoRAError(f"{weights_path}: tensor {name!r} is not a LoRA update of an attention or MLP projection")
        halves.setdefault((int(match.group(1)), match.group(3)), {})[match.group(4)] = tensor
    weights = {}
    for key, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise LoRAError(f"{weights_path}: layer {key[0]} {key[1]} has lora_{''.join(pair)} without its partner")
        a, b = pair["A"], pair["B"]
        _check_rank(a.shape[0] if a.dim() == 2 else 0, f"{weights_path}: layer {key[0]} {key[1]}")
        module_rank = _pattern_value(rank_pattern, key, rank)
        module_alpha = _pattern_value(alpha_pattern, key, alpha)
        if a.shape[0] != module_rank:
            raise LoRAError(f"{weights_path}: layer {key[0]} {key[1]} has rank {a.shape[0]}, the config says {module_rank}")
        weights[key] = LoRAWeights(a, b, lora_scale(float(module_alpha), a.shape[0], rslora))
    adapter = LoRAAdapter(weights, rank, alpha, config.get("base_model_name_or_path"), use_rslora=rslora,
                          extra_config=config)
    return adapter


def _pattern_value(pattern: dict, key: tuple[int, str], default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: keys are module-name suffixes or regexes."""
    layer, module = key
    full = f"model.layers.{layer}.{PROJECTION_PARENT[module]}.{module}"
    for name, value in pattern.items():
        if full.endswith(name) or re.fullmatch(f".*{name}", full):
            return value
    return default


def save_peft(adapter: LoRAAdapter, folder: Path, base_model: str | None = None) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` as PEFT does (loadable by
    `PeftModel.from_pretrained`, vLLM and sugam)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, module), w in sorted(adapter.weights.items()):
        prefix = f"base_model.model.model.layers.{layer}.{PROJECTION_PARENT[module]}.{module}"
        tensors[f"{prefix}.lora_A.weight"] = w.a.detach().contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = w.b.detach().contiguous().cpu()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or adapter.base_model,
        "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": adapter.extra_config.get("lora_dropout", 0.0),
        "target_modules": adapter.target_modules, "bias": "none", "use_rslora": adapter.use_rslora,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "revision": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


# --- llama.cpp GGUF LoRA files --------------------------------------------------------------------

def load_gguf_lora(path: Path) -> LoRAAdapter:
    from ..errors import ModelFormatError
    from ..loader.gguf import GGUFFile, unpermute_rows

    try:
        gguf = GGUFFile(Path(path))
    except ModelFormatError as exc:
        raise LoRAError(str(exc)) from exc
    meta = gguf.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise LoRAError(f"{path}: not a GGUF LoRA adapter (general.type {meta.get('general.type')!r}, "
                        f"adapter.type {meta.get('adapter.type')!r})")
    alpha = meta.get("adapter.lora.alpha", 0.0)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise LoRAError(f"{path}: adapter.lora.alpha must be a number")
    arch = meta.get("general.architecture")
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in gguf.tensors.items():
        if _EXPERT_NAME.search(name):
            raise LoRAError(f"{path}: tensor {name!r} adapts a mixture-of-experts router or expert; sugam "
                            "applies LoRA to attention projections (and dense MLP layers) only")
        match = _GGUF_NAME.match(name)
        if match is None or match.group(2) not in _FROM_GGUF:
            raise LoRAError(f"{path}: tensor {name!r} is not a LoRA update of an attention or MLP projection")
        if len(tensor.shape) != 2:
            raise LoRAError(f"{path}: tensor {name!r} has shape {tensor.shape}, not a matrix")
        key = (int(match.group(1)), _FROM_GGUF[match.group(2)])
        halves.setdefault(key, {})[match.group(3)] = tensor.dequantize()
    weights = {}
    heads = _gguf_heads(meta, arch)
    for key, pair in halves.items():
        if set(pair) != {"a", "b"}:
            raise LoRAError(f"{path}: layer {key[0]} {key[1]} has lora_{''.join(pair)} without its partner")
        a, b = pair["a"], pair["b"]
        _check_rank(a.shape[0], f"{path}: layer {key[0]} {key[1]}")
        if arch == "llama" and key[1] in ("q_proj", "k_proj") and heads is not None:
            n = heads[0] if key[1] == "q_proj" else heads[1]
            if b.shape[0] % (2 * n) == 0:
                b = torch.from_numpy(unpermute_rows(b.numpy(), n).copy())
        # llama.cpp: scale = alpha / rank, or 1 when alpha is 0
        weights[key] = LoRAWeights(a, b, float(alpha) / a.shape[0] if alpha else 1.0)
    rank = max(w.rank for w in weights.values()) if weights else 0
    return LoRAAdapter(weights, rank, float(alpha) or float(rank), meta.get("general.base_model.0.name"),
                       architecture=arch if isinstance(arch, str) else None)


def _gguf_heads(meta: dict, arch: object) -> tuple[int, int] | None:
    if not isinstance(arch, str):
        return None
    q, kv = meta.get(f"{arch}.attention.head_count"), meta.get(f"{arch}.attention.head_count_kv")
    return (q, kv or q) if isinstance(q, int) else None


def save_gguf_lora(adapter: LoRAAdapter, path: Path, cfg: ModelConfig) -> None:
    """llama.cpp's GGUF LoRA format (what its convert_lora_to_gguf.py writes), F32 tensors."""
    import gguf
    import numpy as np

    from ..loader.gguf import unpermute_rows

    scales = {w.scale for w in adapter.weights.values()}
    ranks = {w.rank for w in adapter.weights.values()}
    if len(scales) != 1 or len(ranks) != 1:
        raise LoRAError("GGUF LoRA files hold one alpha for all matrices; this adapter's modules differ in rank or alpha")
    rank, scale = ranks.pop(), scales.pop()
    writer = gguf.GGUFWriter(str(path), cfg.architecture)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", scale * rank)  # llama.cpp scales by alpha / rank
    writer.add_uint32(f"{cfg.architecture}.attention.head_count", cfg.num_attention_heads)
    writer.add_uint32(f"{cfg.architecture}.attention.head_count_kv", cfg.num_key_value_heads)
    for (layer, module), w in sorted(adapter.weights.items()):
        b = w.b.detach().float().cpu().numpy()
        if cfg.architecture == "llama" and module in ("q_proj", "k_proj"):
            b = _permute_rows(b, cfg.num_attention_heads if module == "q_proj" else cfg.num_key_value_heads)
            assert np.array_equal(unpermute_rows(b, cfg.num_attention_heads if module == "q_proj"
                                                 else cfg.num_key_value_heads), w.b.detach().float().cpu().numpy())
        name = f"blk.{layer}.{_GGUF_NAMES[module]}.weight"
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(w.a.detach().float().cpu().numpy()))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _permute_rows(rows, n_heads: int):
    """llama.cpp's q/k permutation (the inverse of loader.gguf.unpermute_rows)."""
    head_rows = rows.shape[0] // n_heads
    return (rows.reshape(n_heads, 2, head_rows // 2, *rows.shape[1:])
                .swapaxes(1, 2).reshape(rows.shape))


def load_adapter(path: str | Path) -> LoRAAdapter:
    """A PEFT folder or a llama.cpp GGUF LoRA file."""
    path = Path(path).expanduser()
    if path.is_dir():
        return load_peft(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return load_gguf_lora(path)
        if path.name in ("adapter_config.json", "adapter_model.safetensors"):
            return load_peft(path.parent)
        raise LoRAError(f"{path}: expected a PEFT adapter folder or a .gguf LoRA file")
    raise LoRAError(f"no adapter at {path}")
