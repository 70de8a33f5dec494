"""Tokenizer (HF `tokenizers`), chat templates in a jinja2 sandbox, and incremental detokenization.

From a GGUF file the tokenizer is rebuilt from metadata: the byte-level BPE vocabulary and merges,
the pre-tokenizer that `tokenizer.ggml.pre` names, and the control / user-defined tokens as added
tokens so they are matched whole. From an HF folder, tokenizer.json is loaded as is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from .chat_template import (
    RESERVED_TEMPLATE_VARIABLES,
    ChatTemplateError,
    TemplateLimitError,
    TemplateLimits,
    render_template,
)
from .errors import ModelFormatError
from .loader.base import TokenizerSpec

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "TemplateLimitError", "Tokenizer", "build_gguf_tokenizer"]

# Split patterns, by the GGUF `tokenizer.ggml.pre` name, of the byte-level BPE families we run.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "llama3": _LLAMA3_SPLIT,
           "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT}
# Pre-tokenizers that are GPT-2's regex, optionally after splitting digits one by one (SmolLM).
_GPT2_LIKE = {"gpt-2": False, "gpt2": False, "default": False, "smollm": True}

_CONTROL, _USER_DEFINED = 3, 4


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def build_gguf_tokenizer(spec: TokenizerSpec) -> HFTokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from GGUF vocabulary, merges and pre-tokenizer name."""
    where = f"{spec.source}: " if spec.source else ""
    alphabet = _byte_alphabet()
    alphabet_chars = set(alphabet.values())
    tokens = spec.tokens or []
    # Tokens are stored in the byte alphabet; a few files store some spelled out: re-spell those.
    spelled = [t if set(t) <= alphabet_chars else "".join(alphabet[b] for b in t.encode("utf-8"))
               for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = []
    for i, line in enumerate(spec.merges or []):
        left, sep, right = line.partition(" ")
        if not sep:
            raise ModelFormatError(f"{where}tokenizer.ggml.merges[{i}] {line[:80]!r} is not two tokens apart")
        merges.append((left, right))
    try:
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    except Exception as exc:  # tokenizers raises a bare Exception for a merge of unknown tokens
        raise ModelFormatError(f"{where}tokenizer.ggml.merges does not fit tokenizer.ggml.tokens ({exc})") from exc

    pre = spec.pre_tokenizer or "default"
    if pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _GPT2_LIKE:
        steps = [pre_tokenizers.Digits(individual_digits=True)] if _GPT2_LIKE[pre] else []
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            steps + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        known = sorted([*_SPLITS, *_GPT2_LIKE])
        raise ModelFormatError(f"{where}pre-tokenizer {pre!r} is not supported (known: {', '.join(known)})")
    tok.decoder = decoders.ByteLevel()

    types = spec.token_types or []
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(spelled, types) if kind == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(spelled, types) if kind == _USER_DEFINED])

    template, pairs = [], []
    if spec.add_bos_token and spec.bos_token_id is not None:
        template.append(spelled[spec.bos_token_id])
        pairs.append((spelled[spec.bos_token_id], spec.bos_token_id))
    template.append("$A")
    if spec.add_eos_token and spec.eos_token_id is not None:
        template.append(spelled[spec.eos_token_id])
        pairs.append((spelled[spec.eos_token_id], spec.eos_token_id))
    if pairs:
        try:
            tok.post_processor = processors.TemplateProcessing(single=" ".join(template), special_tokens=pairs)
        except Exception as exc:  # e.g. a BOS token spelled with a space
            raise ModelFormatError(f"{where}the BOS/EOS tokens cannot be added to prompts ({exc})") from exc
    return tok


class Tokenizer:
    """encode / decode / apply_chat_template, with the special tokens of the model."""

    def __init__(self, spec: TokenizerSpec):
        if spec.tokenizer_json is not None:
            try:
                self._tok = HFTokenizer.from_str(spec.tokenizer_json)
            except Exception as exc:  # tokenizers raises plain Exception on bad JSON
                where = spec.source or "tokenizer.json"
                raise ModelFormatError(f"{where}: cannot be loaded: {exc}") from exc
        else:
            self._tok = build_gguf_tokenizer(spec)
        self.chat_template = spec.chat_template
        self.template_limits = TemplateLimits()
        self.bos_token_id = spec.bos_token_id
        self.eos_token_id = spec.eos_token_id
        self.special_tokens: dict[str, str] = dict(spec.special_token_strings)
        for key, token_id in (("bos_token", spec.bos_token_id), ("eos_token", spec.eos_token_id),
                              ("pad_token", spec.pad_token_id)):
            token = self._tok.id_to_token(token_id) if token_id is not None else None
            if token is not None and key not in self.special_tokens:
                self.special_tokens[key] = token
        for key, attr in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
            if getattr(self, attr) is None and key in self.special_tokens:
                setattr(self, attr, self._tok.token_to_id(self.special_tokens[key]))
        self.all_special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> HFTokenizer:
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True, template_kwargs: Mapping[str, Any] | None = None, *,
                    chat_template: str | None = None) -> str:
        """The prompt text for a conversation, as the model's template writes it.

        `template_kwargs` are extra template variables (e.g. enable_thinking) and may come from a
        request; they can never name the template or the variables the renderer fills in.
        `chat_template` overrides the model's template: for code that chose it, never for requests.
        """
        source, variables = self.chat_variables(messages, tools, add_generation_prompt, template_kwargs,
                                                chat_template=chat_template)
        return render_template(source, variables, self.template_limits)

    def chat_variables(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                       add_generation_prompt: bool = True, template_kwargs: Mapping[str, Any] | None = None, *,
                       chat_template: str | None = None) -> tuple[str, dict[str, Any]]:
        """The template source and the variables `render_chat` renders it with (plain, picklable
        values: the server renders them in a worker process)."""
        source = chat_template or self.chat_template
        if not source:
            raise ChatTemplateError("this model has no chat template; pass raw prompts (or --raw) instead")
        extra = dict(template_kwargs or {})
        reserved = sorted(RESERVED_TEMPLATE_VARIABLES & set(extra))
        if reserved:
            raise ChatTemplateError(f"chat_template_kwargs may not set {', '.join(reserved)}: the server renders "
                                    "only the model's own chat template")
        variables = {**self.special_tokens, **extra, "messages": messages, "tools": tools,
                     "add_generation_prompt": add_generation_prompt}
        return source, variables

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = True, tools: list[dict[str, Any]] | None = None,
                            **template_kwargs: Any) -> list[int] | str:
        text = self.render_chat(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                template_kwargs=template_kwargs)
        # The template writes every special token itself (BOS included), as transformers assumes.
        return self.encode(text, add_special_tokens=False) if tokenize else text


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    Decodes a short window (a few tokens of context plus the unread tokens) and emits only what the
    window adds; a window whose text ends in U+FFFD is still in the middle of a character, so it
    waits for the next token.
    """

    _CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        tail = list(prompt_ids[-self._CONTEXT:])
        self._ids = tail
        self._prefix_offset = 0
        self._read_offset = len(tail)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset], self._skip)
        full = self._tokenizer.decode(self._ids[self._prefix_offset:], self._skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return full[len(prefix):]
        return ""

    def snapshot(self) -> tuple[int, int, int]:
        """Enough to restore this state later (tokens are only ever appended after it)."""
        return len(self._ids), self._prefix_offset, self._read_offset

    def restore(self, snapshot: tuple[int, int, int]) -> None:
        length, self._prefix_offset, self._read_offset = snapshot
        del self._ids[length:]

    def flush(self) -> str:
        """Whatever is left when generation ends, even an incomplete character."""
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset], self._skip)
        full = self._tokenizer.decode(self._ids[self._prefix_offset:], self._skip)
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix):]
