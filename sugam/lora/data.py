"""Training data for `sugam finetune`: JSONL in three shapes, checked whole before training starts.

- `{"messages": [...], "tools": [...]}`: OpenAI's chat fine-tuning format. Rendered by the model's
  own chat template; the loss is on the assistant turns only (an assistant message with
  `"weight": 0` is shown but not trained on). Assistant messages may carry `tool_calls`.
- `{"prompt": "...", "completion": "..."}`: the loss is on the completion (and the end token).
- `{"text": "..."}`: the loss is on every token (and the end token).

DATA is one .jsonl file (split into train/valid with `valid_fraction`, seeded) or a folder with
`train.jsonl` and optionally `valid.jsonl`. Every bad line of every file is reported in one
`DataError`, with its line number, before a model is loaded.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..chat_template import ChatTemplateError
from ..errors import SugamError
from ..tokenizer import Tokenizer

IGNORE = -100                 # label of a token the loss skips (PyTorch's cross_entropy default)
SHAPES = ("messages", "prompt", "text")
ROLES = ("system", "developer", "user", "assistant", "tool")
_SHOWN_PROBLEMS = 30          # a message listing thousands of lines helps nobody; the rest are counted


class DataError(SugamError):
    """Training data that cannot be used: unreadable files or bad lines (all of them, with line numbers)."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        self.problems = list(problems)
        if self.problems:
            shown = "\n  ".join(self.problems[:_SHOWN_PROBLEMS])
            more = len(self.problems) - _SHOWN_PROBLEMS
            message = f"{message}\n  {shown}" + (f"\n  ... and {more} more" if more > 0 else "")
        super().__init__(message)


@dataclass
class Record:
    """One checked line: its shape, its normalised content and where it came from."""
    shape: str                      # "messages" | "prompt" | "text"
    data: dict[str, Any]
    source: str = ""                # "file.jsonl:12", for messages about this example


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]               # IGNORE where no loss; aligned with input_ids (the shift is in the loss)
    source: str = ""

    @property
    def trainable_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


@dataclass
class Dataset:
    train: list[Example]
    valid: list[Example]
    dropped: int = 0                # examples with no trainable token left after truncation
    truncated: int = 0              # examples cut to max_seq_len
    notes: list[str] = field(default_factory=list)


# --- reading and checking ---------------------------------------------------------------------------

def read_records(data: str | Path, valid_fraction: float = 0.1, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, valid) records of a file or a folder; raises DataError listing every bad line."""
    path = Path(data).expanduser()
    if not 0 <= valid_fraction < 1:
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if path.is_dir():
        train_path, valid_path = path / "train.jsonl", path / "valid.jsonl"
        if not train_path.is_file():
            raise DataError(f"{path}: a data folder needs train.jsonl (and optionally valid.jsonl)")
        problems: list[str] = []
        train = _read_file(train_path, problems)
        valid = _read_file(valid_path, problems) if valid_path.is_file() else []
        _raise_if(problems)
        return train, valid
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder (expected a .jsonl file or a folder with train.jsonl)")
    problems = []
    records = _read_file(path, problems)
    _raise_if(problems)
    n_valid = int(len(records) * valid_fraction)   # floor: fewer than 1/valid_fraction examples -> no split
    if n_valid == 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    valid_ids = set(order[:n_valid])
    return ([r for i, r in enumerate(records) if i not in valid_ids],
            [r for i, r in enumerate(records) if i in valid_ids])


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise DataError(f"{len(problems)} bad line{'s' if len(problems) > 1 else ''} in the training data "
                        "(nothing was trained):", problems)


def _read_file(path: Path, problems: list[str]) -> list[Record]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) carry nothing
        where = f"{path.name}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        try:
            records.append(check_record(obj, where))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    if not records and not problems:
        problems.append(f"{path.name}: no examples (the file is empty)")
    return records


def check_record(obj: Any, source: str = "") -> Record:
    """Check one parsed line and normalise it; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    shapes = [s for s in SHAPES if s in obj]
    if "completion" in obj and "prompt" not in obj:
        shapes.append("completion")
    if not shapes:
        keys = ", ".join(sorted(obj)[:5]) or "none"
        raise ValueError(f"unknown shape (keys: {keys}); expected {{\"messages\": [...]}}, "
                         "{\"prompt\": ..., \"completion\": ...} or {\"text\": ...}")
    if len(shapes) > 1:
        raise ValueError(f"mixes shapes ({', '.join(shapes)}); use one per line")
    shape = shapes[0]
    if shape == "messages":
        return Record("messages", _check_messages(obj), source)
    if shape in ("prompt", "completion"):
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("\"prompt\" and \"completion\" must both be strings")
        if not completion.strip():
            raise ValueError("empty \"completion\" (nothing to learn)")
        return Record("prompt", {"prompt": prompt, "completion": completion}, source)
    text = obj["text"]
    if not isinstance(text, str):
        raise ValueError(f"\"text\" must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("empty \"text\"")
    return Record("text", {"text": text}, source)


def _check_messages(obj: dict[str, Any]) -> dict[str, Any]:
    messages, tools = obj["messages"], obj.get("tools")
    if not isinstance(messages, list) or not messages:
        raise ValueError("\"messages\" must be a non-empty list")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise ValueError("\"tools\" must be a list of objects")
    out, trained = [], 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}")
        content = _text_content(m.get("content"), where)
        calls = m.get("tool_calls")
        if calls is not None and role != "assistant":
            raise ValueError(f"{where}: only assistant messages have tool_calls")
        message: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        if calls:
            message["tool_calls"] = _check_tool_calls(calls, where)
        elif not content.strip() and role in ("user", "assistant"):
            raise ValueError(f"{where}: empty {role} message")
        for key in ("name", "tool_call_id"):
            if isinstance(m.get(key), str):
                message[key] = m[key]
        weight = m.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise ValueError(f"{where}.weight must be 0 or 1")
        if role == "assistant":
            message["weight"] = weight
            trained += weight
        out.append(message)
    if not trained:
        raise ValueError("no assistant message to train on")
    return {"messages": out, "tools": tools}


def _text_content(content: Any, where: str) -> str:
    """A string, or OpenAI's list of text parts joined (what chat templates read)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ValueError(f"{where}.content must be a string or a list of text parts")


def _check_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise ValueError(f"{where}.tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{where}.tool_calls[{j}] needs function.name")
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI sends a JSON string; templates print an object (as the server does)
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}.tool_calls[{j}].function.arguments is not valid JSON ({exc.msg})") from None
        if not isinstance(arguments, dict):
            raise ValueError(f"{where}.tool_calls[{j}].function.arguments must be an object")
        out.append({"id": call.get("id") or f"call_{j}", "type": "function",
                    "function": {"name": fn["name"], "arguments": arguments}})
    return out


# --- tokenizing ---------------------------------------------------------------------------------------

def tokenize(records: list[Record], tokenizer: Tokenizer, max_seq_len: int,
             train_on_prompt: bool = False) -> tuple[list[Example], int, int]:
    """(examples, dropped, truncated). Raises DataError listing every record the template cannot render."""
    examples, problems, dropped, truncated = [], [], 0, 0
    for record in records:
        try:
            ids, labels = tokenize_record(record, tokenizer, train_on_prompt)
        except (SugamError, ValueError) as exc:
            problems.append(f"{record.source}: {exc}")
            continue
        if len(ids) > max_seq_len:
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            truncated += 1
        # The loss predicts token t from tokens < t: the first token's label is never used.
        if all(label == IGNORE for label in labels[1:]):
            dropped += 1
            continue
        examples.append(Example(ids, labels, record.source))
    if problems:
        raise DataError(f"{len(problems)} example{'s' if len(problems) > 1 else ''} could not be tokenized "
                        "(nothing was trained):", problems)
    return examples, dropped, truncated


def tokenize_record(record: Record, tokenizer: Tokenizer, train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record."""
    eos = tokenizer.eos_token_id
    end = [eos] if eos is not None else []
    if record.shape == "text":
        ids = tokenizer.encode(record.data["text"]) + end
        return ids, list(ids)
    if record.shape == "prompt":
        prompt = tokenizer.encode(record.data["prompt"])
        completion = tokenizer.encode(record.data["completion"], add_special_tokens=False) + end
        ids = prompt + completion
        return ids, list(ids) if train_on_prompt else [IGNORE] * len(prompt) + completion
    text, spans = assistant_spans(tokenizer, record.data["messages"], record.data["tools"])
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = list(encoding.ids)
    if train_on_prompt:
        return ids, list(ids)
    labels = [IGNORE] * len(ids)
    for i, (start, stop) in enumerate(encoding.offsets):
        # A token belongs to a span when its characters overlap it (several tokens of one
        # multi-byte character share that character's offsets).
        if any(start < s_end and stop > s_start for s_start, s_end in spans):
            labels[i] = ids[i]
    return ids, labels


def assistant_spans(tokenizer: Tokenizer, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the trained assistant turns.

    Each turn is found by rendering the conversation up to it twice, with the generation prompt
    (where the model starts writing) and with the turn (where it stops): the difference is exactly
    what the model generates, end token included, as the template writes it. Templates that render
    earlier turns differently from the last one (e.g. dropping old reasoning) fall back to finding
    that text, or the content alone, later in the full rendering.
    """
    def render(msgs: list[dict[str, Any]], generation_prompt: bool) -> str:
        clean = [{k: v for k, v in m.items() if k != "weight"} for m in msgs]
        return tokenizer.render_chat(clean, tools=tools, add_generation_prompt=generation_prompt)

    full = render(messages, False)
    spans, cursor = [], 0
    span: tuple[int, int] | None
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before, through = render(messages[:i], True), render(messages[:i + 1], False)
            turn = through[len(before):].rstrip() if through.startswith(before) else None
        except ChatTemplateError:  # e.g. a template that refuses a conversation starting this way
            before = through = ""
            turn = None
        if turn and full.startswith(through) and len(before) >= cursor:
            span = (len(before), len(before) + len(turn))
        elif turn and (found := full.find(turn, cursor)) >= 0:
            span = (found, found + len(turn))
        else:
            span = _find_content(full, message["content"], cursor, tokenizer.special_tokens.get("eos_token"))
            if span is None:
                raise ValueError(f"the chat template does not show assistant message {i} where it can be found; "
                                 "use prompt/completion lines for this model")
        cursor = span[1]
        if message.get("weight", 1):
            spans.append(span)
    return full, spans


def _find_content(full: str, content: str, cursor: int, eos: str | None) -> tuple[int, int] | None:
    """The span of an assistant turn's content in the rendering (without reasoning the template may
    drop from earlier turns), extended over the end token that follows it."""
    for candidate in (content.strip(), content.rpartition("</think>")[2].strip()):
        found = full.find(candidate, cursor) if candidate else -1
        if found >= 0:
            stop = found + len(candidate)
            if eos and full.startswith(eos, stop):  # the turn's end token: the model learns to stop
                stop += len(eos)
            return found, stop
    return None
