"""Structured output: a grammar (from a JSON schema or a regex, compiled by llguidance) masks the
logits so that every sampled token keeps the output a valid prefix of a conforming document."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from ..sampling_params import InvalidRequestError
from ..tokenizer import Tokenizer


class GrammarCompiler:
    """Builds one llguidance matcher per request; the tokenizer view is built once (about a second)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]):
        self._tokenizer, self._vocab_size, self._eos = tokenizer, vocab_size, eos_token_ids
        self._ll_tokenizer: Any = None

    def _lltok(self) -> Any:
        if self._ll_tokenizer is None:
            import llguidance

            self._ll_tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(
                _TokenBytes(self._tokenizer, self._vocab_size, self._eos)))
        return self._ll_tokenizer

    def matcher(self, json_schema: dict[str, Any] | None = None, regex: str | None = None) -> GrammarMatcher:
        import llguidance

        what = "JSON schema" if json_schema is not None else "regex"
        try:
            if json_schema is not None:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    json.dumps(json_schema), overrides={"whitespace_flexible": False})
            else:
                grammar = llguidance.LLMatcher.grammar_from_regex(regex or "")
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(f"invalid {what}: {exc}") from exc
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._lltok())
        if is_error:
            raise InvalidRequestError(f"unsupported {what}: {messages[0] if messages else 'invalid'}")
        matcher = llguidance.LLMatcher(self._lltok(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"unsupported {what}: {matcher.get_error()}")
        return GrammarMatcher(matcher, self._vocab_size)


class GrammarMatcher:
    def __init__(self, matcher: Any, vocab_size: int):
        self._m, self._vocab_size = matcher, vocab_size

    def mask_logits(self, logits: torch.Tensor) -> None:
        """Set every token the grammar forbids next to -inf (in place)."""
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:self._vocab_size].astype(bool)
        logits[torch.from_numpy(~allowed).to(logits.device)] = float("-inf")

    def accept(self, token: int) -> None:
        self._m.consume_token(token)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens."""
        self._m.rollback(num_tokens)

    @property
    def done(self) -> bool:
        """The document is complete: only end-of-sequence may follow."""
        return self._m.is_stopped()

    @property
    def failed(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


class _TokenBytes:
    """The vocabulary as llguidance's TokenizerWrapper wants it: the bytes of every token id.

    Built by us rather than from tokenizer.json because llguidance treats every added token as
    special, while Qwen's <think> and <tool_call> are ordinary text the grammar must be able to
    match. Special tokens, and the padding ids past the tokenizer's vocabulary, are listed as
    special so text grammars never produce them.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]):
        from .. import tokenizer as tok_module

        self._tokenizer = tokenizer
        backend = tokenizer.backend
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        byte_level = "ByteLevel" in json.dumps(decoder)
        alphabet = {ch: b for b, ch in tok_module._byte_alphabet().items()}
        added = backend.get_added_tokens_decoder()
        self.tokens: list[bytes] = []
        self.special_token_ids = sorted(tokenizer.all_special_ids)
        for i in range(vocab_size):
            piece = backend.id_to_token(i)
            if piece is None:
                self.tokens.append(b"")
                self.special_token_ids.append(i)
            elif i in added:
                self.tokens.append(added[i].content.encode("utf-8"))
            elif byte_level and all(ch in alphabet for ch in piece):
                self.tokens.append(bytes(alphabet[ch] for ch in piece))
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                self.tokens.append(bytes([int(piece[3:5], 16)]))  # sentencepiece byte fallback
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode("utf-8"))
        self.eos_token_id = eos_token_ids[0] if eos_token_ids else tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_special_tokens=False)
