"""Tokenizer from GGUF metadata, chat templates in a sandbox, incremental detokenization."""

from __future__ import annotations

import pytest
from conftest import CHATML, train_tokenizer

from sugam.loader.base import TokenizerSpec
from sugam.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer

TEXTS = ["Hello world!", "你好，世界！🎉", "আমি বাংলায় গান গাই।", "emoji 👨‍👩‍👧 family", "x = 1_000 + 2"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TokenizerSpec(tokenizer_json=train_tokenizer().to_str(), chat_template=CHATML,
                                   special_token_strings={"eos_token": "<|im_end|>"}))


def test_round_trip(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_incremental_detokenizer_never_splits_a_character(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        detok = IncrementalDetokenizer(tok, tok.encode("prompt: "))
        pieces = [detok.push(i) for i in ids]
        pieces.append(detok.flush())
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces), pieces


def test_multibyte_characters_arrive_whole():
    # A byte-level vocabulary with no merges: every UTF-8 byte is its own token.
    t = Tokenizer(TokenizerSpec(tokenizer_json=train_tokenizer(vocab_size=260).to_str()))
    text = "你🎉ক"
    ids = t.encode(text)
    assert len(ids) > len(text)  # characters really are split across tokens
    detok = IncrementalDetokenizer(t, [])
    deltas = [d for d in (detok.push(i) for i in ids) if d]
    assert deltas == list(text)


def test_chat_template_renders_with_specials_and_kwargs(tok):
    msgs = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(msgs)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert ids.count(tok.token_to_id("<|im_start|>")) == 2  # special tokens stay whole


def test_template_helpers_and_sandbox(tok):
    template = ("{% if enable_thinking is defined and not enable_thinking %}NOTHINK{% endif %}"
                "{{ tools | tojson }}|{{ strftime_now('%Y') | length }}|{{ eos_token }}")
    out = tok.render_chat([], tools=[{"name": "f<x>"}], template_kwargs={"enable_thinking": False},
                          chat_template=template)
    assert out == 'NOTHINK[{"name": "f<x>"}]|4|<|im_end|>'
    with pytest.raises(ChatTemplateError, match="only user"):
        tok.render_chat([], chat_template="{{ raise_exception('only user') }}")
    with pytest.raises(ChatTemplateError, match="'__class__' of 'str' object is unsafe"):  # the sandbox refuses Python internals
        tok.render_chat([], chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
