"""`sugam finetune`: data checking and loss masks, the training forward against transformers, training
(loss falls, the output loads in peft with the same logits), exact resume after Ctrl-C, a quantized
GGUF base, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from conftest import CHATML, train_tokenizer
from gguf_writer import write_gguf

from sugam import native
from sugam.cli import main
from sugam.loader import open_checkpoint
from sugam.lora import finetune as ft
from sugam.lora.adapter import load_peft
from sugam.lora.data import IGNORE, DataError, Record, read_records, tokenize, tokenize_record
from sugam.lora.finetune import FinetuneError, finetune, parse_target_modules
from sugam.lora.training import (
    LoRALinear,
    attach_lora,
    frozen_product,
    hidden_states,
    lm_loss,
    load_base,
    logits,
)
from sugam.quant.linear import QuantizedLinear
from sugam.tokenizer import Tokenizer

CPU = torch.device("cpu")
CHAT = [{"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": f"Say {w}"},
                      {"role": "assistant", "content": f"{w} world"}]} for w in ("hello", "quick", "brown", "lazy")]
TOOL_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest, and steady when other work shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def tokenizer_of(folder: Path) -> Tokenizer:
    return Tokenizer(open_checkpoint(folder).tokenizer)


def labelled_runs(tok: Tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded text of each contiguous run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


# --- data -----------------------------------------------------------------------------------------

def test_each_shape_parses_and_splits(tmp_path):
    rows = CHAT + [{"prompt": "2+2=", "completion": "4"}, {"text": "The quick brown fox."}]
    train, valid = read_records(write_jsonl(tmp_path / "d.jsonl", rows + [""]), valid_fraction=0.0)
    assert [r.shape for r in train] == ["messages"] * 4 + ["prompt", "text"] and valid == []
    assert train[4].source == "d.jsonl:5"
    # a single file is split by valid_fraction, seeded; a folder keeps its own split
    many = write_jsonl(tmp_path / "many.jsonl", [{"text": f"example {i}"} for i in range(20)])
    a_train, a_valid = read_records(many, valid_fraction=0.25, seed=1)
    b_train, b_valid = read_records(many, valid_fraction=0.25, seed=1)
    assert len(a_valid) == 5 and len(a_train) == 15 and [r.data for r in a_valid] == [r.data for r in b_valid]
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "valid.jsonl", CHAT[:1])
    train, valid = read_records(folder, valid_fraction=0.5)
    assert len(train) == 6 and len(valid) == 1


def test_every_bad_line_is_reported_at_once_before_the_model_loads(tmp_path):
    rows = [CHAT[0], "{not json", {"foo": 1}, {"text": 3}, {"text": "  "}, CHAT[1],
            {"prompt": "a"}, {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "wizard", "content": "x"}]}, {"text": "a", "prompt": "b", "completion": "c"},
            {"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]}]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        # a model that does not exist: the data error comes first, before anything is loaded
        finetune(str(tmp_path / "no-such-model"), data, tmp_path / "out")
    message = str(info.value)
    assert len(info.value.problems) == 9
    for line, words in [(2, "not valid JSON"), (3, "unknown shape"), (4, "must be a string"), (5, "empty"),
                        (7, "must both be strings"), (8, "no assistant message"), (9, "role"),
                        (10, "mixes shapes"), (11, "arguments is not valid JSON")]:
        assert f"bad.jsonl:{line}: " in message and words in message, (line, message)
    assert "bad.jsonl:1:" not in message and "bad.jsonl:6:" not in message
    assert not (tmp_path / "out").exists()


def test_loss_masks_cover_only_what_the_model_writes(tiny_models):
    tok = tokenizer_of(tiny_models["qwen2"][0])
    conversation = {"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Say hello"},
                                 {"role": "assistant", "content": "hello world"},
                                 {"role": "user", "content": "Again"},
                                 {"role": "assistant", "content": "not this one", "weight": 0},
                                 {"role": "user", "content": "Last"},
                                 {"role": "assistant", "content": "the quick fox"}]}
    (record,), _ = read_records_from([conversation])
    ids, labels = tokenize_record(record, tok)
    assert labelled_runs(tok, ids, labels) == ["hello world<|im_end|>", "the quick fox<|im_end|>"]
    assert tok.decode(ids, skip_special_tokens=False) == tok.render_chat(
        [{k: v for k, v in m.items() if k != "weight"} for m in conversation["messages"]], add_generation_prompt=False)
    # prompt/completion: the completion and the end token; text: everything and the end token
    ids, labels = tokenize_record(Record("prompt", {"prompt": "2+2=", "completion": " 4"}), tok)
    assert labelled_runs(tok, ids, labels) == [" 4<|im_end|>"]
    ids, labels = tokenize_record(Record("text", {"text": "The quick brown fox."}), tok)
    assert labels == ids and tok.decode(ids, skip_special_tokens=False) == "The quick brown fox.<|im_end|>"
    ids, labels = tokenize_record(record, tok, train_on_prompt=True)
    assert labels == ids


def test_tool_calls_are_trained_and_long_examples_cut_or_dropped(tiny_models):
    tok = tokenizer_of(tiny_models["qwen2"][0])
    tok.chat_template = TOOL_TEMPLATE
    line = {"tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}],
            "messages": [{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "",
                          "tool_calls": [{"id": "c1", "type": "function",
                                          "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 2}"}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "4"},
                         {"role": "assistant", "content": "It is 4."}]}
    (record,), _ = read_records_from([line])
    ids, labels = tokenize_record(record, tok)
    assert labelled_runs(tok, ids, labels) == [
        '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 2}}</tool_call><|im_end|>', "It is 4.<|im_end|>"]
    # cut to max_seq_len; an example left with no trainable token is dropped and counted
    records, _ = read_records_from([CHAT[0], {"prompt": "a long prompt " * 20, "completion": "x"}])
    ids, labels = tokenize_record(records[0], tok)
    limit = next(i for i, label in enumerate(labels) if label != IGNORE) + 3  # 3 answer tokens stay; no completion
    examples, dropped, truncated = tokenize(records, tok, max_seq_len=limit)
    assert len(examples) == 1 and dropped == 1 and truncated == 2
    assert examples[0].input_ids == ids[:limit] and examples[0].trainable_tokens == 3


def test_turns_a_template_renders_differently_later_are_still_found(tiny_models):
    """Qwen3-style: reasoning is kept only in the last assistant turn, so the conversation's rendering
    is not an extension of each turn's own; the earlier turn is found by its visible content."""
    tok = tokenizer_of(tiny_models["qwen2"][0])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                         "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
                         "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    line = {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "<think>r1</think>a1"},
                         {"role": "user", "content": "two"}, {"role": "assistant", "content": "<think>r2</think>a2"}]}
    (record,), _ = read_records_from([line])
    ids, labels = tokenize_record(record, tok)
    assert labelled_runs(tok, ids, labels) == ["a1<|im_end|>", "<think>r2</think>a2<|im_end|>"]


def read_records_from(rows: list) -> tuple[list[Record], list[Record]]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return read_records(write_jsonl(Path(folder) / "d.jsonl", rows), valid_fraction=0.0)


# --- the training forward -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_training_forward_equals_transformers(tiny_models, arch):
    folder, hf = tiny_models[arch]
    model, mode = load_base(folder, CPU, torch.float32)
    attach_lora(model, rank=4, alpha=8, dropout=0.0)   # B starts at zero: the base model exactly
    assert mode == "none"
    ids = torch.randint(3, 300, (2, 14), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0                                     # a right-padded row
    with torch.no_grad():
        ours = logits(model, hidden_states(model, ids, mask))
        ref = hf(input_ids=ids, attention_mask=mask).logits
    assert (ours[0] - ref[0]).abs().max() <= 1e-4
    assert (ours[1, :9] - ref[1, :9]).abs().max() <= 1e-4
    # checkpointed and plain forwards give the same loss and gradients
    labels = ids.masked_fill(mask == 0, IGNORE)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        loss, n = lm_loss(model, hidden_states(model, ids, mask, checkpointing), labels)
        (loss / n).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert n == 13 + 8 and torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


# --- training -----------------------------------------------------------------------------------------

def test_loss_falls_and_the_adapter_loads_in_peft_with_the_same_logits(tiny_models, tmp_path):
    import transformers
    from peft import PeftModel

    folder, _ = tiny_models["qwen2"]
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", CHAT)
    write_jsonl(data / "valid.jsonl", CHAT[:2])
    result = finetune(str(folder), data, tmp_path / "out", iters=30, learning_rate=1e-2, dtype="float32",
                      device="cpu", save_every=0, eval_every=10, progress=False, target_modules="q,v,o,down",
                      rank=4, alpha=8)
    assert result.steps == 30 and len(result.losses) == 30 and result.valid_examples == 2
    assert result.last_loss < 0.3 * result.first_loss, result.losses
    assert result.valid_loss < 0.3 * result.first_loss
    assert result.tokens_per_second > 0 and result.trainable_parameters > 0
    out = tmp_path / "out"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "valid_loss" in r] == [10, 20]   # and at the end, in the result
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == str(folder)
    assert config["target_modules"] == ["q_proj", "v_proj", "o_proj", "down_proj"]
    assert not list(out.glob("checkpoint-*")) and (out / "finetune.json").is_file()

    # ours: the base with the saved adapter put back
    model, _ = load_base(folder, CPU, torch.float32)
    loras = attach_lora(model, ("q_proj", "v_proj", "o_proj", "down_proj"), rank=4, alpha=8)
    adapter = load_peft(out)
    with torch.no_grad():
        for key, module in loras.items():
            module.lora_A.copy_(adapter.weights[key].a)
            module.lora_B.copy_(adapter.weights[key].b)
    assert any(m.lora_B.abs().sum() > 0 for m in loras.values())
    peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(folder), str(out)).eval()
    ids = torch.tensor([tokenizer_of(folder).apply_chat_template(CHAT[0]["messages"], add_generation_prompt=False)])
    with torch.no_grad():
        ours = logits(model, hidden_states(model, ids))
        theirs = peft_model(input_ids=ids).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            untouched = base(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-4
    assert (theirs - untouched).abs().max() > 1e-2    # the adapter does change the model


def test_ctrl_c_saves_and_resume_reaches_the_same_weights(tiny_models, tmp_path, monkeypatch, capsys):
    folder, _ = tiny_models["qwen2"]
    data = write_jsonl(tmp_path / "d.jsonl", CHAT + [{"prompt": "2+2=", "completion": "4"}])
    options = dict(iters=6, learning_rate=5e-3, dropout=0.2, batch_size=2, grad_accum=2, dtype="float32",
                   device="cpu", save_every=0, progress=False, valid_fraction=0.0, rank=4,
                   target_modules=("q_proj", "up_proj"))
    whole = finetune(str(folder), data, tmp_path / "whole", **options)

    original = ft.learning_rate

    def interrupt_at_step_4(step, total, config):
        if step == 3:
            raise KeyboardInterrupt
        return original(step, total, config)

    monkeypatch.setattr(ft, "learning_rate", interrupt_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        finetune(str(folder), data, tmp_path / "parts", **options)
    assert "saved" in capsys.readouterr().err
    saved = tmp_path / "parts" / "checkpoint-3"
    state = json.loads((saved / "trainer_state.json").read_text())
    assert state["step"] == 3 and len(state["losses"]) == 3 and not (tmp_path / "parts" / "adapter_config.json").exists()
    with pytest.raises(FinetuneError, match="--resume"):   # a second run into the folder must say how to go on
        finetune(str(folder), data, tmp_path / "parts", **options)

    monkeypatch.setattr(ft, "learning_rate", original)
    resumed = finetune(str(folder), data, tmp_path / "parts", resume=True, **options)
    assert resumed.start_step == 3 and resumed.steps == 6
    assert resumed.losses == whole.losses
    a, b = load_peft(tmp_path / "whole"), load_peft(tmp_path / "parts")
    for key in a.weights:
        assert torch.equal(a.weights[key].a, b.weights[key].a) and torch.equal(a.weights[key].b, b.weights[key].b)


def test_quantized_gguf_base_trains_only_lora_and_backward_is_exact(tmp_path, tiny_models):
    _, hf = tiny_models["qwen2"]
    path = tmp_path / "q8.gguf"
    write_gguf(path, hf, train_tokenizer(), chat_template=CHATML, quant=gguf.GGMLQuantizationType.Q8_0)
    model, mode = load_base(path, CPU, torch.float32)
    assert mode == "gguf"
    loras = attach_lora(model, rank=4, alpha=8, dropout=0.0)
    bases = [m.base for m in loras.values()]
    assert all(isinstance(b, QuantizedLinear) for b in bases)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    # backward through the frozen quantized product equals autograd through its dequantized matrix
    base = bases[0]
    from sugam.quant.linear import packed_kernel_max_rows

    rows = packed_kernel_max_rows(torch.float32) + 8  # above the kernels' row limit: the GEMM path
    x = torch.randn(rows, base.in_features, requires_grad=True)
    y = frozen_product(base, x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    w = base.quantized_weight.dequantize(torch.float32)
    assert torch.allclose(x.grad, grad_out @ w, atol=1e-4)
    assert torch.allclose(y, x.detach() @ w.t() + (base.bias if base.bias is not None else 0), atol=1e-3)

    ids = torch.tensor([tokenizer_of(tiny_models["qwen2"][0]).encode("The quick brown fox jumps")])
    loss, n = lm_loss(model, hidden_states(model, ids, gradient_checkpointing=True), ids)
    (loss / n).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in name for name in with_grad)
    # the file's blocks where sugam's kernels run, else int8 codes (the runner's policy for Q8_0)
    stored = {"packed"} if native.available() else {"q", "scale"}
    assert {name.rsplit(".", 1)[1] for name, _ in model.named_buffers() if ".base." in name} == stored

    data = write_jsonl(tmp_path / "d.jsonl", CHAT)
    result = finetune(str(path), data, tmp_path / "out", iters=15, learning_rate=1e-2, dtype="bfloat16", device="cpu",
                      save_every=0, progress=False)   # bf16: the compute dtype a CPU with bf16 uses by default
    assert result.last_loss < 0.5 * result.first_loss, result.losses


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_int8_and_int4_bases_give_exact_input_gradients(tiny_models, fmt):
    from sugam.quant.formats import int4_layout

    if fmt == "int4" and int4_layout() is None:
        pytest.skip("PyTorch's int4 CPU kernel is unavailable here")
    model, mode = load_base(tiny_models["qwen2"][0], CPU, torch.float32, quantization=fmt)
    module = model.model.layers[0].mlp.gate_proj
    assert mode == fmt and isinstance(module, QuantizedLinear) and module.weight_format == fmt
    for rows in (5, 40):   # the kernels' path and the dequantize + GEMM path
        x = torch.randn(rows, module.in_features, requires_grad=True)
        y = frozen_product(module, x)
        grad_out = torch.randn_like(y)
        y.backward(grad_out)
        w = module.quantized_weight.dequantize(torch.float32)
        assert torch.allclose(x.grad, grad_out @ w, atol=1e-4)
    assert isinstance(attach_lora(model, ("gate_proj",), 2, 4)[(0, "gate_proj")], LoRALinear)


# --- options and the command line ----------------------------------------------------------------------

def test_target_module_names_and_bad_options(tmp_path):
    assert parse_target_modules("v,q") == ("q_proj", "v_proj")
    assert parse_target_modules("attention") == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert parse_target_modules("mlp,q_proj") == ("q_proj", "gate_proj", "up_proj", "down_proj")
    with pytest.raises(FinetuneError, match="unknown target module"):
        parse_target_modules("q,wq")
    data = write_jsonl(tmp_path / "d.jsonl", CHAT)
    with pytest.raises(FinetuneError, match="rank must be a positive integer.*dropout"):
        finetune("x", data, tmp_path / "out", rank=0, dropout=1.5)
    with pytest.raises(FinetuneError, match="unknown option learning_rat"):
        finetune("x", data, tmp_path / "out", learning_rat=1e-3)


def test_cli_finetunes_end_to_end_and_reports_bad_data(tiny_models, tmp_path, capsys):
    folder, _ = tiny_models["llama"]   # tied embeddings: the LM head is the embedding
    data = write_jsonl(tmp_path / "d.jsonl", CHAT)
    out = tmp_path / "adapter"
    code = main(["finetune", str(folder), str(data), "--output", str(out), "--iters", "4", "--device", "cpu",
                 "--dtype", "bfloat16", "--rank", "2", "--target-modules", "q,v", "--save-every", "2",
                 "--lr", "1e-3", "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "4 steps" in captured.out and "train loss" in captured.out and str(out) in captured.out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert load_peft(out).target_modules == ["q_proj", "v_proj"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]

    bad = write_jsonl(tmp_path / "bad.jsonl", [CHAT[0], {"messages": []}, "[1, 2"])
    code = main(["finetune", str(folder), str(bad), "--output", str(tmp_path / "x"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "error: 2 bad lines" in err and "bad.jsonl:2:" in err and "bad.jsonl:3: not valid JSON" in err
    code = main(["finetune", str(folder), str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "x")])
    assert code == 1 and "no such file" in capsys.readouterr().err
    code = main(["finetune", str(folder), str(data), "--output", str(tmp_path / "x"), "--rank", "0"])
    assert code == 1 and "rank must be a positive integer" in capsys.readouterr().err
    code = main(["finetune", str(folder), str(data), "--output", str(out)])   # holds a fine-tune already
    assert code == 1 and "--resume" in capsys.readouterr().err
    if not torch.cuda.is_available():
        code = main(["finetune", str(folder), str(data), "--output", str(tmp_path / "x"), "--device", "cuda"])
        assert code == 1 and "no CUDA GPU" in capsys.readouterr().err
