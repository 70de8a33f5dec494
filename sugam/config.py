"""Model configuration, read from an HF `config.json` or from GGUF metadata.

One dataclass describes every architecture sugam runs: Qwen2/2.5/QwQ/R1-Distill (QKV bias),
Qwen3 (q/k RMSNorm, explicit head_dim) and Llama are flags of the same transformer. The
mixture-of-experts Qwens (qwen2_moe, qwen3_moe) add the expert fields (num_experts > 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelFormatError

# HF model_type / GGUF general.architecture -> the architecture family registered in models/registry.py.
_ARCH_ALIASES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama", "mistral": "llama",
                 "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
_QWEN3_STYLE = ("qwen3", "qwen3_moe")   # q/k RMSNorm


def _supported() -> str:
    from .models.registry import supported_architectures  # late: the models import this module

    return ", ".join(supported_architectures())


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None or a dict with at least "rope_type" ("linear", "dynamic", "yarn", "llama3") and "factor".
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False       # Qwen2 family
    o_bias: bool = False         # Llama with attention_bias=True
    mlp_bias: bool = False
    qk_norm: bool = False        # Qwen3
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # Mixture of experts (qwen2_moe / qwen3_moe); num_experts 0 means a dense model. A sparse layer
    # routes each token to num_experts_per_tok of num_experts MLPs of width moe_intermediate_size;
    # the other layers (mlp_only_layers, or off the decoder_sparse_step) keep a dense MLP of
    # intermediate_size. shared_expert_intermediate_size > 0: qwen2_moe's gated shared expert.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        from .models.registry import model_class

        model_class(self.architecture)  # an unknown architecture is refused here, naming the known ones
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelFormatError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelFormatError(
                f"{self.num_attention_heads} attention heads cannot be grouped over "
                f"{self.num_key_value_heads} key/value heads"
            )
        if self.head_dim % 2:
            raise ModelFormatError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        self._check_experts()

    def _check_experts(self) -> None:
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "shared_expert_intermediate_size", "decoder_sparse_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ModelFormatError(f"config field {name} must be a non-negative integer, got {value!r}")
        if self.architecture.endswith("_moe") and self.num_experts == 0:
            raise ModelFormatError(f"a {self.architecture} config needs num_experts > 0")
        if self.num_experts == 0:
            return
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ModelFormatError(f"num_experts_per_tok must be 1 to num_experts ({self.num_experts}), "
                                   f"got {self.num_experts_per_tok}")
        if self.moe_intermediate_size <= 0 or self.decoder_sparse_step <= 0:
            raise ModelFormatError("moe_intermediate_size and decoder_sparse_step must be positive for an "
                                   "expert model")
        if any(isinstance(i, bool) or not isinstance(i, int) for i in self.mlp_only_layers):
            raise ModelFormatError(f"mlp_only_layers must list layer numbers, got {self.mlp_only_layers!r}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def expert_params(self) -> tuple[int, int]:
        """(parameters of the sparse layers' MLPs, those one token reads): routers, routed experts
        (all of them / num_experts_per_tok) and shared experts with their gates. (0, 0) when dense."""
        h = self.hidden_size
        sparse = sum(self.sparse_layer(i) for i in range(self.num_hidden_layers))
        expert = 3 * h * self.moe_intermediate_size + (2 * self.moe_intermediate_size + h if self.mlp_bias else 0)
        shared = self.shared_expert_intermediate_size
        always = h * self.num_experts + (3 * h * shared + h if shared else 0)
        return (sparse * (always + self.num_experts * expert),
                sparse * (always + self.num_experts_per_tok * expert))

    def sparse_layer(self, layer: int) -> bool:
        """Whether `layer` routes through experts (transformers' rule for Qwen2-MoE / Qwen3-MoE)."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def context_length(self) -> int:
        """The longest sequence the model is meant to see (scaled RoPE extends the original)."""
        scaling = self.rope_scaling or {}
        original = scaling.get("original_max_position_embeddings")
        if scaling.get("rope_type") in ("yarn", "dynamic", "linear") and original:
            return max(self.max_position_embeddings, int(original * float(scaling.get("factor", 1.0))))
        return self.max_position_embeddings

    # ---- readers -----------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """From a transformers `config.json`, in the 4.x form (`torch_dtype`, `rope_theta`,
        `rope_scaling`) or the 5.x form (`dtype`, `rope_parameters`)."""
        model_type = cfg.get("model_type", "")
        arch = _ARCH_ALIASES.get(model_type) if isinstance(model_type, str) else None
        if arch is None:
            raise ModelFormatError(
                f"unsupported model_type {model_type!r}; sugam runs {_supported()}"
            )
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            if heads <= 0:
                raise ModelFormatError(f"config.json num_attention_heads must be a positive integer, got {heads}")
            rope_params = dict(cfg.get("rope_parameters") or {})
            rope_theta = float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
            scaling = cfg.get("rope_scaling") or rope_params or None
            eos = cfg.get("eos_token_id")
            moe = _hf_experts(cfg) if arch.endswith("_moe") else {}
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=normalize_rope_scaling(scaling),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=(arch == "qwen2") or (arch == "qwen2_moe" and bool(cfg.get("qkv_bias", True)))
                or bool(cfg.get("attention_bias", False)),
                o_bias=arch == "llama" and bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=arch in _QWEN3_STYLE,
                torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=_as_id_list(eos),
                **moe,
            )
        except KeyError as exc:
            raise ModelFormatError(f"config.json lacks {exc}") from exc
        except (TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:
            raise ModelFormatError(f"config.json has a bad field: {exc}") from exc

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], vocab_size: int, tensor_names: set[str]) -> ModelConfig:
        """From GGUF metadata (llama.cpp key names); biases, q/k norms and a tied head are read
        off the tensor list, which is what decides them. Every value is checked before it is
        used (a head count of 0 must not become a division by zero)."""
        gguf_arch = meta.get("general.architecture")
        arch = _ARCH_ALIASES.get(gguf_arch) if isinstance(gguf_arch, str) else None
        if arch is None:
            raise ModelFormatError(
                f"unsupported architecture {gguf_arch!r}; sugam runs {_supported()}"
            )

        def integer(key: str, default: int | None = None) -> int:
            name = f"{gguf_arch}.{key}"
            value = meta.get(name, default)
            if value is None:
                raise ModelFormatError(f"GGUF metadata lacks {name}")
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelFormatError(f"GGUF metadata {name} must be a positive integer, got {value!r}")
            return value

        def number(key: str, default: float) -> float:
            name = f"{gguf_arch}.{key}"
            value = meta.get(name, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ModelFormatError(f"GGUF metadata {name} must be a positive finite number, got {value!r}")
            return float(value)

        heads = integer("attention.head_count")
        hidden = integer("embedding_length")
        scaling = None
        scaling_type = meta.get(f"{gguf_arch}.rope.scaling.type")
        if scaling_type and scaling_type != "none":
            original = meta.get(f"{gguf_arch}.rope.scaling.original_context_length")
            scaling = {
                "rope_type": scaling_type,
                "factor": number("rope.scaling.factor", 1.0),
                "original_max_position_embeddings":
                    integer("rope.scaling.original_context_length") if original is not None else None,
            }
        moe: dict[str, Any] = {}
        if arch.endswith("_moe"):
            # llama.cpp has no dense-layer list for these: a layer without a router is a dense one.
            layers = integer("block_count")
            shared = f"{gguf_arch}.expert_shared_feed_forward_length"
            norm = meta.get(f"{gguf_arch}.expert_weights_norm")
            moe = {"num_experts": integer("expert_count"), "num_experts_per_tok": integer("expert_used_count"),
                   "moe_intermediate_size": integer("expert_feed_forward_length"),
                   "shared_expert_intermediate_size": integer("expert_shared_feed_forward_length")
                   if shared in meta else 0,
                   # llama.cpp's qwen3moe renormalises the top-k weights, its qwen2moe does not.
                   "norm_topk_prob": bool(norm) if isinstance(norm, bool) else arch == "qwen3_moe",
                   "mlp_only_layers": [i for i in range(min(layers, len(tensor_names)))
                                       if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names]}
        dense_layers = bool(moe.get("mlp_only_layers")) or not moe
        return cls(
            architecture=arch,
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=integer("feed_forward_length") if dense_layers
            else int(meta.get(f"{gguf_arch}.feed_forward_length") or 1),
            num_hidden_layers=integer("block_count"),
            num_attention_heads=heads,
            num_key_value_heads=integer("attention.head_count_kv", heads),
            head_dim=integer("attention.key_length", hidden // heads),
            rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=number("rope.freq_base", 10000.0),
            rope_scaling=normalize_rope_scaling(scaling),
            max_position_embeddings=integer("context_length", 4096),
            tie_word_embeddings="output.weight" not in tensor_names,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            o_bias="blk.0.attn_output.bias" in tensor_names,
            mlp_bias="blk.0.ffn_up.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            torch_dtype="float32",
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=_as_id_list(meta.get("tokenizer.ggml.eos_token_id")),
            **moe,
        )


def _hf_experts(cfg: dict[str, Any]) -> dict[str, Any]:
    """The expert fields of a qwen2_moe / qwen3_moe config.json (transformers 5 writes
    num_local_experts, the published checkpoints num_experts)."""
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, list):
        raise ModelFormatError(f"mlp_only_layers must be a list, got {only!r}")
    return {"num_experts": int(experts) if experts is not None else 0,
            "num_experts_per_tok": int(cfg.get("num_experts_per_tok", 0)),
            "moe_intermediate_size": int(cfg.get("moe_intermediate_size", 0)),
            "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
            "shared_expert_intermediate_size": int(cfg.get("shared_expert_intermediate_size") or 0)
            if cfg.get("model_type") == "qwen2_moe" else 0,
            "decoder_sparse_step": int(cfg.get("decoder_sparse_step") or 1),
            "mlp_only_layers": [int(i) for i in only]}


def normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """One spelling for RoPE scaling: `rope_type` key, no-op types dropped."""
    if not scaling:
        return None
    scaling = dict(scaling)
    rope_type = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    scaling.pop("rope_theta", None)
    if rope_type in ("default", "none"):
        return None
    if rope_type not in ("linear", "dynamic", "yarn", "llama3"):
        raise ModelFormatError(f"unsupported RoPE scaling type {rope_type!r}")
    scaling["rope_type"] = rope_type
    scaling["factor"] = float(scaling.get("factor", 1.0))
    return scaling


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]
