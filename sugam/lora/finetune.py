"""`sugam finetune`: LoRA fine-tuning of a frozen (possibly quantized) base on any torch device.

>>> from sugam.lora.finetune import finetune
>>> result = finetune("qwen2.5-coder-0.5b-instruct", "data.jsonl", "my-adapter", iters=200)
>>> print(result.summary())

The data is read and checked whole first (sugam/lora/data.py), then the model is built
(sugam/lora/training.py) and trained with AdamW. OUTPUT receives the adapter in PEFT's format
(adapter_config.json + adapter_model.safetensors: loadable by peft, vLLM and `sugam serve`),
finetune.json (options and summary) and, with save_every, OUTPUT/checkpoint-STEP folders from which
`resume` continues exactly. Checkpoints hold tensors in safetensors and everything else in JSON:
nothing is pickled, so loading one never runs code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SugamError
from .adapter import TARGET_MODULES, LoRAError, load_peft, save_peft
from .data import IGNORE, Example, read_records, tokenize
from .training import LoRALinear, attach_lora, hidden_states, lm_loss, load_base, lora_parameters, to_adapter

if TYPE_CHECKING:
    from ..models.qwen2 import CausalLM

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
TENSORS_FILE = "training_state.safetensors"
_SCHEDULES = ("cosine", "linear", "constant")


class FinetuneError(SugamError):
    """Options, folders or checkpoints that cannot be used for fine-tuning."""


@dataclass
class FinetuneConfig:
    """Every option of `finetune()` / `sugam finetune` (the CLI flags have the same names)."""
    # LoRA
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = TARGET_MODULES
    # optimisation
    learning_rate: float = 2e-4
    lr_schedule: str = "cosine"            # cosine | linear | constant, after the warmup
    warmup_steps: int | None = None        # None: 5% of the steps, at most 100
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0      # None or 0: no clipping
    epochs: float = 1.0
    iters: int | None = None               # optimizer steps; overrides epochs
    batch_size: int = 1
    grad_accum: int = 1
    seed: int = 0
    # data
    max_seq_len: int = 2048
    valid_fraction: float = 0.1            # a single file: this share becomes the validation set
    train_on_prompt: bool = False
    # when to evaluate and save (0: never, except validation at the end)
    eval_every: int = 100
    save_every: int = 100
    # model and device
    device: str = "auto"                   # auto (cuda, then mps, then cpu) or any torch device
    dtype: str = "auto"                    # auto: bf16 where the device computes it natively, else fp32
    quantization: str = "auto"             # as for `sugam run`: a GGUF stays quantized on the CPU
    gradient_checkpointing: bool = True
    # bookkeeping
    resume: bool | str = False             # True: the latest checkpoint in OUTPUT; or a checkpoint folder
    overwrite: bool = False                # allow an OUTPUT that already holds a fine-tune
    progress: bool | None = None           # the progress bar (None: when stderr is a terminal)

    def check(self) -> None:
        """Refuse impossible options with a message naming them (before anything is loaded)."""
        problems = []
        for name in ("rank", "batch_size", "grad_accum", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(f"{name} must be 0 or a positive integer, got {value!r}")
        if self.iters is not None and (not isinstance(self.iters, int) or self.iters <= 0):
            problems.append(f"iters must be a positive integer, got {self.iters!r}")
        if self.iters is None and not self.epochs > 0:
            problems.append(f"epochs must be positive, got {self.epochs!r}")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be positive, got {self.learning_rate!r}")
        if not self.alpha > 0:
            problems.append(f"alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 <= self.valid_fraction < 1:
            problems.append(f"valid_fraction must be in [0, 1), got {self.valid_fraction!r}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must not be negative, got {self.weight_decay!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            problems.append(f"warmup_steps must not be negative, got {self.warmup_steps!r}")
        if self.lr_schedule not in _SCHEDULES:
            problems.append(f"lr_schedule {self.lr_schedule!r}; use one of {', '.join(_SCHEDULES)}")
        if not self.target_modules:
            problems.append("target_modules is empty")
        unknown = [m for m in self.target_modules if m not in TARGET_MODULES]
        if unknown:
            problems.append(f"unknown target modules {', '.join(unknown)}; choose from {', '.join(TARGET_MODULES)}")
        if problems:
            raise FinetuneError("; ".join(problems))


def parse_target_modules(text: str) -> tuple[str, ...]:
    """"q,v" / "q_proj,v_proj" / "all" / "attention" / "mlp" -> module names in TARGET_MODULES order."""
    groups = {"all": TARGET_MODULES, "attention": TARGET_MODULES[:4], "attn": TARGET_MODULES[:4],
              "mlp": TARGET_MODULES[4:]}
    names: set[str] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item in groups:
            names.update(groups[item])
            continue
        name = item if item.endswith("_proj") else f"{item}_proj"
        if name not in TARGET_MODULES:
            raise FinetuneError(f"unknown target module {item!r}; use q, k, v, o, gate, up, down "
                                "(or their _proj names), attention, mlp or all")
        names.add(name)
    return tuple(m for m in TARGET_MODULES if m in names)


@dataclass
class FinetuneResult:
    output: Path
    steps: int                      # optimizer steps done in all (resumed runs included)
    start_step: int                 # where this run began (0, or the resumed checkpoint's step)
    train_examples: int
    valid_examples: int
    dropped_examples: int           # no trainable token left after truncation
    trainable_parameters: int
    first_loss: float | None        # training loss of the first and last steps
    last_loss: float | None
    valid_loss: float | None
    tokens: int                     # tokens this run processed (padding excluded)
    tokens_per_second: float
    seconds: float
    losses: list[float] = field(default_factory=list)   # every step's training loss, from step 1

    def summary(self) -> str:
        loss = (f"train loss {self.first_loss:.4f} -> {self.last_loss:.4f}" if self.first_loss is not None
                else "no training steps")
        valid = f", valid loss {self.valid_loss:.4f}" if self.valid_loss is not None else ""
        resumed = f" (resumed at {self.start_step})" if self.start_step else ""
        dropped = f"; {self.dropped_examples} examples dropped (no trainable token)" if self.dropped_examples else ""
        return (f"{self.steps} steps{resumed}, {self.train_examples} train / {self.valid_examples} valid examples"
                f"{dropped}; {loss}{valid}; {self.tokens_per_second:.0f} tok/s, {self.seconds:.1f} s; "
                f"adapter ({self.trainable_parameters:,} parameters) in {self.output}")


# --- device and dtype -------------------------------------------------------------------------------

def pick_training_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    from ..llm import pick_device

    chosen = pick_device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(f"device {device}: this PyTorch build sees no CUDA GPU (try --device cpu)")
    if chosen.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise FinetuneError(f"device {device}: MPS is not available here (try --device cpu)")
    return chosen


def pick_training_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """auto: bf16 where the device computes it natively (CUDA with bf16, CPUs with AVX-512 BF16 / AMX /
    ARM BF16), else fp32. fp16 is allowed but has no loss scaling: prefer bf16 or fp32."""
    if dtype != "auto":
        from ..llm import pick_dtype

        return pick_dtype(dtype, device)
    if device.type == "cpu":
        from ..hardware import cpu_compute_dtype

        return cpu_compute_dtype()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# --- batches and schedule --------------------------------------------------------------------------

class Batches:
    """Micro-batch i of the whole run, the same whatever step a run starts at (so a resumed run sees
    the data in the same order): epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.per_epoch = math.ceil(len(examples) / batch_size)
        self._orders: dict[int, list[int]] = {}

    def __getitem__(self, index: int) -> list[Example]:
        epoch, within = divmod(index, self.per_epoch)
        order = self._orders.get(epoch)
        if order is None:
            order = list(range(len(self.examples)))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return [self.examples[i] for i in order[within * self.batch_size:(within + 1) * self.batch_size]]


def collate(batch: list[Example], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return ids.to(device), mask.to(device), labels.to(device)


def _labelled(e: Example) -> int:
    return sum(1 for t in e.labels[1:] if t != IGNORE)


def learning_rate(step: int, total: int, config: FinetuneConfig) -> float:
    """The rate of optimizer step `step` (0-based): linear warmup, then cosine / linear decay towards 0."""
    warmup = config.warmup_steps if config.warmup_steps is not None else min(100, round(0.05 * total))
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    if config.lr_schedule == "constant":
        return config.learning_rate
    progress = (step - warmup) / max(1, total - warmup)
    if config.lr_schedule == "linear":
        return config.learning_rate * (1 - progress)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


# --- checkpoints (safetensors + JSON, never pickle) ---------------------------------------------------

def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"rng.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"rng.cuda.{i}"] = s
    elif device.type == "mps":
        state["rng.mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    if device.type == "cuda":
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                           key=lambda k: int(k.rsplit(".", 1)[1]))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    elif device.type == "mps" and "rng.mps" in tensors:
        torch.mps.set_rng_state(tensors["rng.mps"])


def _json_safe(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return value


def save_checkpoint(folder: Path, step: int, total_steps: int, loras: dict[tuple[int, str], LoRALinear],
                    optimizer: torch.optim.Optimizer, rng: dict[str, torch.Tensor], config: FinetuneConfig,
                    base_model: str, losses: list[float]) -> Path:
    """OUTPUT/checkpoint-STEP: the adapter (PEFT), optimizer moments and RNG states (safetensors),
    the rest (JSON). Written beside and renamed into place: a crash never leaves a half checkpoint."""
    from safetensors.torch import save_file

    target = folder / f"{CHECKPOINT_PREFIX}{step}"
    tmp = folder / f".{CHECKPOINT_PREFIX}{step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    save_peft(to_adapter(loras, base_model, config.dropout), tmp)
    names = {id(p): name for name, p in lora_parameters(loras).items()}
    tensors = dict(rng)
    params_by_index = [p for group in optimizer.param_groups for p in group["params"]]
    for param, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"optimizer.{names[id(param)]}.{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(tmp / TENSORS_FILE))
    groups = [{k: _json_safe(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    state = {"format": 1, "step": step, "total_steps": total_steps, "base_model": base_model, "losses": losses,
             "optimizer_param_groups": groups, "optimizer_params": [names[id(p)] for p in params_by_index],
             "config": {k: _json_safe(v) for k, v in dataclasses.asdict(config).items()}}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def find_checkpoint(output: Path, resume: bool | str) -> Path | None:
    """The checkpoint `resume` names: True -> the highest step in OUTPUT; a path -> that folder."""
    if resume is False or resume is None:
        return None
    if resume is True or resume == "latest":
        steps = []
        if output.is_dir():
            for child in output.iterdir():
                suffix = child.name.removeprefix(CHECKPOINT_PREFIX)
                if child.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and (child / STATE_FILE).is_file():
                    steps.append((int(suffix), child))
        if not steps:
            raise FinetuneError(f"nothing to resume: {output} holds no {CHECKPOINT_PREFIX}STEP folder")
        return max(steps)[1]
    folder = Path(resume).expanduser()
    if not (folder / STATE_FILE).is_file():
        raise FinetuneError(f"{folder}: not a checkpoint (no {STATE_FILE})")
    return folder


def load_checkpoint(folder: Path, loras: dict[tuple[int, str], LoRALinear], optimizer: torch.optim.Optimizer,
                    config: FinetuneConfig, device: torch.device) -> tuple[int, list[float]]:
    """Restore the adapter, optimizer and RNG states; returns (step, losses so far)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = json.loads((folder / STATE_FILE).read_text())
        tensors = load_file(str(folder / TENSORS_FILE))
        adapter = load_peft(folder)
    except (OSError, ValueError, SafetensorError, LoRAError) as exc:
        raise FinetuneError(f"{folder}: cannot read the checkpoint ({exc})") from exc
    saved = state.get("config", {})
    for setting in ("rank", "alpha", "target_modules"):
        mine, theirs = _json_safe(getattr(config, setting)), saved.get(setting)
        if mine != theirs:
            raise FinetuneError(f"{folder} was trained with {setting} {theirs}, not {mine}: resume with the same LoRA shape")
    if set(adapter.weights) != set(loras):
        raise FinetuneError(f"{folder}: its adapter does not cover the same layers and modules as this model")
    with torch.no_grad():
        for key, module in loras.items():
            module.lora_A.copy_(adapter.weights[key].a)
            module.lora_B.copy_(adapter.weights[key].b)
    params = lora_parameters(loras)
    groups = state["optimizer_param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    order = state["optimizer_params"]
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for index, name in enumerate(order):
        entries = {key.rsplit(".", 1)[1]: t for key, t in tensors.items() if key.startswith(f"optimizer.{name}.")}
        if entries:
            opt_state[index] = entries
    try:
        optimizer.load_state_dict({"state": opt_state,
                                   "param_groups": [{**g, "params": list(range(len(order)))} for g in groups]})
    except (ValueError, KeyError) as exc:
        raise FinetuneError(f"{folder}: the optimizer state does not fit this model ({exc})") from exc
    if list(params) != order:
        raise FinetuneError(f"{folder}: its parameters differ from this model's")
    _set_rng_state(tensors, device)
    return int(state["step"]), [float(x) for x in state.get("losses", [])]


# --- the loop ---------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: CausalLM, examples: list[Example], batch_size: int, device: torch.device) -> float:
    """Mean cross-entropy over the labelled tokens of `examples` (dropout off)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            ids, mask, labels = collate(examples[start:start + batch_size], device)
            loss, n = lm_loss(model, hidden_states(model, ids, mask), labels)
            total, count = total + float(loss), count + n
    finally:
        model.train(was_training)
    return total / max(1, count)


def _check_output(output: Path, config: FinetuneConfig) -> None:
    if config.resume or config.overwrite or not output.exists():
        return
    if not output.is_dir():
        raise FinetuneError(f"{output} exists and is not a folder")
    if (output / "adapter_config.json").exists() or any(output.glob(f"{CHECKPOINT_PREFIX}*")):
        raise FinetuneError(f"{output} already holds a fine-tune: continue it with --resume, "
                            "or pass --overwrite, or choose another --output")


def finetune(model: str, data: str | Path, output: str | Path, config: FinetuneConfig | None = None,
             **options: Any) -> FinetuneResult:
    """Train a LoRA adapter for `model` (an alias, .gguf, HF folder or hf:ORG/NAME) on `data` (a .jsonl
    file or a folder with train.jsonl / valid.jsonl) and write it to `output`. `options` are
    FinetuneConfig fields and override `config`'s. Ctrl-C saves a checkpoint and re-raises."""
    from ..loader import open_checkpoint
    from ..registry import resolve
    from ..tokenizer import Tokenizer

    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise FinetuneError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    config = dataclasses.replace(config or FinetuneConfig(), **options)
    if isinstance(config.target_modules, str):
        config.target_modules = parse_target_modules(config.target_modules)
    config.target_modules = tuple(config.target_modules)
    config.check()
    output = Path(output).expanduser()
    _check_output(output, config)
    resume_from = find_checkpoint(output, config.resume)
    device = pick_training_device(config.device)
    dtype = pick_training_dtype(config.dtype, device)

    # Everything a user can get wrong is found before the weights load.
    train_records, valid_records = read_records(data, config.valid_fraction, config.seed)
    path = resolve(model)
    ckpt = open_checkpoint(path)
    tokenizer = Tokenizer(ckpt.tokenizer)
    train, dropped, truncated = tokenize(train_records, tokenizer, config.max_seq_len, config.train_on_prompt)
    valid, dropped_valid, _ = tokenize(valid_records, tokenizer, config.max_seq_len, config.train_on_prompt)
    if not train:
        raise FinetuneError(f"no training example has a token to learn after truncation to {config.max_seq_len} "
                            f"tokens ({dropped} dropped): raise --max-seq-len")
    if truncated:
        log.warning("%d training examples were cut to %d tokens", truncated, config.max_seq_len)

    torch.manual_seed(config.seed)   # the LoRA init (a resumed run then loads its checkpoint's weights)
    net, mode = load_base(path, device, dtype, config.quantization, ckpt)
    trainer = _Trainer(net, train, valid, config, output, model, device)
    if resume_from is not None:
        trainer.resume(resume_from)
    show = config.progress if config.progress is not None else sys.stderr.isatty()
    _say(show, f"fine-tuning {path.name}: {len(train)} train / {len(valid)} valid examples, {trainer.total} steps "
               f"({config.batch_size} x {config.grad_accum} examples each), LoRA rank {config.rank} on "
               f"{', '.join(config.target_modules)} ({trainer.num_parameters:,} parameters); "
               f"{device} {str(dtype).removeprefix('torch.')}, {mode} weights"
               + (f"; resuming at step {trainer.step} from {resume_from}" if resume_from else ""))
    output.mkdir(parents=True, exist_ok=True)
    trainer.run(show)

    valid_loss = trainer.evaluate() if valid else None
    if config.save_every and trainer.step > trainer.last_saved:
        trainer.save()
    save_peft(to_adapter(trainer.loras, model, config.dropout), output, base_model=model)
    losses = trainer.losses
    result = FinetuneResult(
        output=output, steps=trainer.step, start_step=trainer.start_step, train_examples=len(train),
        valid_examples=len(valid), dropped_examples=dropped + dropped_valid, trainable_parameters=trainer.num_parameters,
        first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None, valid_loss=valid_loss,
        tokens=trainer.tokens, seconds=trainer.seconds,
        tokens_per_second=trainer.tokens / trainer.seconds if trainer.seconds else 0.0, losses=list(losses))
    summary = {k: _json_safe(v) for k, v in dataclasses.asdict(result).items() if k != "losses"}
    (output / "finetune.json").write_text(json.dumps(
        {"base_model": model, "data": str(data), "quantization": mode, "dtype": str(dtype).removeprefix("torch."),
         "device": str(device), "config": {k: _json_safe(v) for k, v in dataclasses.asdict(config).items()},
         "result": summary}, indent=1) + "\n")
    return result


class _Trainer:
    """The LoRA modules, the optimizer and where the run stands (step, losses, RNG, last checkpoint)."""

    def __init__(self, net: CausalLM, train: list[Example], valid: list[Example], config: FinetuneConfig,
                 output: Path, base_model: str, device: torch.device):
        self.net, self.valid, self.config, self.output = net, valid, config, output
        self.base_model, self.device = base_model, device
        self.loras = attach_lora(net, config.target_modules, config.rank, config.alpha, config.dropout)
        self.params = lora_parameters(self.loras)
        self.num_parameters = sum(p.numel() for p in self.params.values())
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.batches = Batches(train, config.batch_size, config.seed)
        self.total = config.iters or math.ceil(config.epochs * self.batches.per_epoch / config.grad_accum)
        self.step = self.start_step = 0
        self.losses: list[float] = []
        self.last_saved = -1
        self.tokens, self.seconds = 0, 0.0
        self.rng = _rng_state(device)   # the RNG as the last finished step left it (what a checkpoint saves)

    def resume(self, folder: Path) -> None:
        self.step, losses = load_checkpoint(folder, self.loras, self.optimizer, self.config, self.device)
        self.losses = losses[:self.step]
        self.start_step = self.last_saved = self.step
        self.rng = _rng_state(self.device)

    def save(self) -> Path:
        self.last_saved = self.step
        return save_checkpoint(self.output, self.step, self.total, self.loras, self.optimizer, self.rng,
                               self.config, self.base_model, self.losses)

    def evaluate(self) -> float:
        return evaluate(self.net, self.valid, self.config.batch_size, self.device)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches; (mean loss per labelled token, learning rate)."""
        config = self.config
        micro = [self.batches[self.step * config.grad_accum + j] for j in range(config.grad_accum)]
        labelled = sum(_labelled(e) for batch in micro for e in batch)
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        for batch in micro:
            ids, mask, labels = collate(batch, self.device)
            loss, _ = lm_loss(self.net, hidden_states(self.net, ids, mask, config.gradient_checkpointing), labels)
            (loss / labelled).backward()   # the step's mean over all its labelled tokens
            total_loss += float(loss.detach())
            self.tokens += int(mask.sum())
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params.values(), config.max_grad_norm)
        rate = learning_rate(self.step, self.total, config)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        self.optimizer.step()
        self.step += 1
        self.rng = _rng_state(self.device)
        return total_loss / labelled, rate

    def run(self, show: bool) -> None:
        from tqdm import tqdm

        config = self.config
        log_file = _open_log(self.output / "train_log.jsonl", self.step)
        bar = tqdm(total=self.total, initial=self.step, desc="finetune", unit="step", disable=not show,
                   file=sys.stderr)
        self.net.train()
        try:
            while self.step < self.total:
                began = time.perf_counter()
                loss, rate = self.train_step()
                self.seconds += time.perf_counter() - began
                self.losses.append(loss)
                record: dict[str, Any] = {"step": self.step, "loss": loss, "lr": rate}
                if config.eval_every and self.valid and self.step % config.eval_every == 0 and self.step < self.total:
                    record["valid_loss"] = self.evaluate()
                    bar.write(f"step {self.step}: valid loss {record['valid_loss']:.4f}")
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self.tokens / max(self.seconds, 1e-9):.0f}", lr=f"{rate:.2e}")
                bar.update(1)
                if config.save_every and self.step % config.save_every == 0:
                    self.save()
        except KeyboardInterrupt:
            bar.close()
            if self.step == self.start_step:
                print("\ninterrupted before a step finished: nothing new to save", file=sys.stderr)
                raise
            # the state after the last finished step (a half-done step is dropped)
            where = self.save() if self.step > self.last_saved else self.output / f"{CHECKPOINT_PREFIX}{self.step}"
            print(f"\ninterrupted at step {self.step}/{self.total}: saved {where}; continue with --resume",
                  file=sys.stderr)
            raise
        finally:
            bar.close()
            log_file.close()


def _open_log(path: Path, step: int) -> Any:
    """The per-step log, keeping only the steps before `step` (a resumed run redoes the later ones)."""
    kept = []
    if step and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line + "\n")
            except (ValueError, AttributeError):
                continue
    handle = path.open("w", encoding="utf-8")
    handle.writelines(kept)
    return handle


def _say(show: bool, message: str) -> None:
    if show:
        print(message, file=sys.stderr)
    log.info(message)
