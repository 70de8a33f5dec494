"""HF folders: config.json, (sharded) safetensors, tokenizer.json, chat template, generation_config.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..quant.export import METADATA_KEY, assemble, check_layout
from ..quant.export import PARTS as _PARTS
from ..quant.formats import INT4_GROUP, quantize
from ..quant.policy import WeightChooser
from .base import GenerationDefaults, LoadedCheckpoint, TokenizerSpec

if TYPE_CHECKING:
    from ..distributed.sharding import ShardPlan
    from .base import LoadedWeight

QUANT_PARTS = {part for parts in _PARTS.values() for part in parts}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path}: cannot parse ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return data


def _flag(folder: Path, tok_cfg: dict[str, Any], key: str) -> bool:
    value = tok_cfg.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):  # the string "false" must not read as True
        raise ModelFormatError(f"{folder / 'tokenizer_config.json'}: {key} must be true or false, not {value!r}")
    return value


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFormatError(f"{index}: no weight_map")
        names = sorted(set(map(str, weight_map.values())))
        outside = [n for n in names if Path(n).name != n]
        if outside:
            raise ModelFormatError(f"{index}: shard names must be plain file names: {', '.join(outside)}")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelFormatError(f"{index}: shards missing: {', '.join(missing)}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
            raise ModelFormatError(f"{folder}: only pickle weights (.bin/.pt) found; sugam loads safetensors only")
        raise ModelFormatError(f"{folder}: no .safetensors weights found")
    return files


def open_hf_folder(folder: Path) -> LoadedCheckpoint:
    try:
        config = ModelConfig.from_hf(_read_json(folder / "config.json"))
    except ModelFormatError as exc:  # name the file: the config alone does not know it
        message = str(exc)
        raise ModelFormatError(message if message.startswith(str(folder)) else f"{folder / 'config.json'}: {message}") \
            from None
    files = _weight_files(folder)

    tok_cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelFormatError(f"{folder}: no tokenizer.json")
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif (folder / "chat_template.json").is_file():
        template = _read_json(folder / "chat_template.json").get("chat_template")
    else:
        template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # a list of named templates: take "default"
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise ModelFormatError(f"{folder}: the chat template must be a string, not {type(template).__name__}")

    specials = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = tok_cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            specials[key] = value
    spec = TokenizerSpec(
        tokenizer_json=tokenizer_file.read_text(encoding="utf-8"),
        add_bos_token=_flag(folder, tok_cfg, "add_bos_token"),
        add_eos_token=_flag(folder, tok_cfg, "add_eos_token"),
        chat_template=template,
        special_token_strings=specials,
        source=str(tokenizer_file),
    )

    generation = GenerationDefaults(eos_token_ids=list(config.eos_token_ids))
    gen_file = folder / "generation_config.json"
    if gen_file.is_file():
        gen = _read_json(gen_file)
        eos = gen.get("eos_token_id")
        if eos is not None:
            ids = eos if isinstance(eos, list) else [eos]
            generation.eos_token_ids = list(dict.fromkeys([*generation.eos_token_ids, *map(int, ids)]))
        if gen.get("do_sample", True):
            # Sampling defaults apply only when the checkpoint samples; do_sample=False means greedy.
            for key in ("temperature", "top_p", "top_k", "min_p"):
                if gen.get(key) is not None:
                    setattr(generation, key, gen[key])
        else:
            generation.temperature = 0.0
        if gen.get("repetition_penalty") is not None:  # applies to greedy decoding too
            generation.repetition_penalty = gen["repetition_penalty"]
    config.eos_token_ids = generation.eos_token_ids

    def iter_weights(choose: WeightChooser | None = None, shard: ShardPlan | None = None
                     ) -> Iterator[tuple[str, LoadedWeight]]:
        """`shard`: a tensor-parallel ShardPlan (distributed/sharding.py): each tensor is cut to this
        rank's share before it is quantized."""
        from safetensors import SafetensorError, safe_open

        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    meta = f.metadata() or {}
                    if meta.get(METADATA_KEY) and shard is not None:
                        raise ModelFormatError(f"{file}: a `sugam quantize` folder cannot be split over ranks; "
                                               "use the original checkpoint with --tensor-parallel-size")
                    if meta.get(METADATA_KEY):  # written by `sugam quantize`: parts -> quantized weights
                        check_layout(meta, file)
                        pending: dict[str, dict[str, torch.Tensor]] = {}
                        for name in f.keys():
                            base, _, part = name.rpartition(".")
                            if base.endswith(".weight") and part in QUANT_PARTS:
                                pending.setdefault(base, {})[part] = f.get_tensor(name)
                                weight = assemble(pending[base], int(meta.get("int4_group", INT4_GROUP)))
                                if weight is not None:
                                    del pending[base]
                                    yield base, weight
                            else:
                                yield name, f.get_tensor(name)
                        if pending:
                            raise ModelFormatError(f"{file}: incomplete quantized weights: {', '.join(pending)}")
                        continue
                    for name in f.keys():
                        tensor = f.get_tensor(name)
                        if shard is not None:
                            tensor = shard.shard_dense(name, tensor)
                        fmt = choose(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")) if choose else None
                        yield name, tensor if fmt is None else quantize(tensor, fmt)
            except (OSError, SafetensorError) as exc:
                raise ModelFormatError(f"{file}: cannot read safetensors ({exc})") from exc

    info = {"format": "safetensors", "files": len(files)}
    quantized = _quantization_marker(files[0])
    if quantized:
        info[METADATA_KEY] = quantized
    return LoadedCheckpoint(path=folder, config=config, tokenizer=spec, generation=generation,
                            iter_weights=iter_weights, info=info)


def _quantization_marker(file: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return (f.metadata() or {}).get(METADATA_KEY)
    except (OSError, SafetensorError) as exc:
        raise ModelFormatError(f"{file}: cannot read safetensors ({exc})") from exc
