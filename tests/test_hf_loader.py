"""HF folders: sharded safetensors, chat_template.jinja, generation_config.json defaults, unsafe formats."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import build_hf_model

from sugam import LLM, SamplingParams
from sugam.errors import ModelFormatError
from sugam.loader import open_checkpoint

PROMPT = [5, 17, 42, 99, 7, 3]


def test_sharded_folder_with_jinja_template_and_generation_defaults(tmp_path, tiny_models):
    folder = tmp_path / "sharded"
    model = build_hf_model(tmp_path / "unused", "qwen2")
    model.save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "unused" / name, folder / name)
    (folder / "chat_template.jinja").write_text("JINJA:{{ messages[0]['content'] }}")
    single = LLM(str(tmp_path / "unused"), dtype="float32")
    greedy = single.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    stop_id = greedy[0].outputs[0].token_ids[4]
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.0, "top_k": 7, "eos_token_id": [2, stop_id]}))

    llm = LLM(str(folder), dtype="float32")
    assert llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "JINJA:x"
    out = llm.generate([PROMPT], SamplingParams(max_tokens=10))[0].outputs[0]
    # temperature 0 and the extra eos id come from generation_config.json
    first = greedy[0].outputs[0].token_ids.index(stop_id)
    assert out.token_ids == greedy[0].outputs[0].token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_pickle_only_folder_is_refused(tmp_path, tiny_models):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_models["qwen2"][0], folder)
    for f in folder.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelFormatError, match="safetensors only"):
        open_checkpoint(folder)


def test_config_that_disagrees_with_weights_is_refused(tmp_path, tiny_models):
    folder = tmp_path / "bad"
    shutil.copytree(tiny_models["qwen2"][0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="mlp"):
        LLM(str(folder), dtype="float32")
    cfg["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="unsupported model_type 'gpt_neox'; sugam runs qwen2, qwen3, llama"):
        open_checkpoint(folder)


def test_models_come_from_the_registry_by_architecture():
    from sugam.config import ModelConfig
    from sugam.models import LlamaForCausalLM, Qwen3ForCausalLM, model_class, supported_architectures

    assert supported_architectures() == ("qwen2", "qwen3", "llama", "qwen3_moe", "qwen2_moe")
    assert model_class("qwen3") is Qwen3ForCausalLM and model_class("llama") is LlamaForCausalLM
    # the native decoder computes dense layers only (models/moe.py)
    assert [a for a in supported_architectures() if model_class(a).declares_native_decoder()] == \
        ["qwen2", "qwen3", "llama"]
    with pytest.raises(ModelFormatError, match="unsupported architecture 'mamba'; sugam runs qwen2, qwen3, llama"):
        model_class("mamba")
    with pytest.raises(ModelFormatError, match="unsupported architecture 'mamba'"):
        ModelConfig("mamba", 10, 8, 8, 1, 2, 1, 4)
