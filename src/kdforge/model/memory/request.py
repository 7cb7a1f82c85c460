"""What `kdforge estimate-memory` asks for, answered: the setup the flags describe over the one
`kdforge train` would run here, the vocabulary of a student that leaves it open, and the answer
(the lead line and the report, or the JSON). The command only parses flags and prints.
Raises UsageError naming the flag or field for input that cannot be estimated."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kdforge.errors import UsageError
from kdforge.model.memory.estimate import GB, MB, LoraSetup, Setup, estimate
from kdforge.model.memory.report import model_json, model_report, report, to_json
from kdforge.model.memory.trace import estimate_model, lora_field

if TYPE_CHECKING:
    from kdforge.model.shape import ModelCfg

DEFAULT_VOCAB = 32000  # assumed for a preset that takes its vocab from a tokenizer when none is given


@dataclass(frozen=True)
class MemoryRequest:
    """The flags given (None: not given, the machine's setup decides)."""

    micro_batch: int | None = None
    seq_len: int | None = None
    dtype: str | None = None
    optimizer_dtype: str | None = None
    master_weights: bool = False
    lora: bool | None = None
    lora_r: int | None = None
    gradient_checkpointing: bool | None = None
    attention: str = "sdpa"
    vocab_size: int | None = None
    as_json: bool = False


def requested_setup(machine: Setup, request: MemoryRequest, built_student: bool) -> Setup:
    """`machine` (how train would run here) with the flags given over it; exit 2 naming the flag
    for a bad one. A `model.path` model's layer names are PEFT's to check, not the student's."""
    given = {"micro_batch": request.micro_batch, "seq_len": request.seq_len, "dtype": request.dtype,
             "optimizer_dtype": request.optimizer_dtype, "gradient_checkpointing": request.gradient_checkpointing,
             "attention": request.attention, "master_weights": request.master_weights or None}
    setup = replace(machine, **{key: value for key, value in given.items() if value is not None})
    if request.lora is False and request.lora_r is not None:
        raise UsageError("--lora-r with --no-lora: drop one")
    if request.lora is False:
        setup = replace(setup, lora=None)
    elif request.lora or request.lora_r is not None:
        base = setup.lora or LoraSetup()
        setup = replace(setup, lora=replace(base, r=request.lora_r or base.r))
    problems = [(field, message) for field, message in setup.problems()
                if built_student or field != "lora.target_modules"]
    if problems:
        raise UsageError("; ".join(f"--{field.replace('_', '-')}: {message}" for field, message in problems))
    return setup


def lead(total: int, dtype: str, where: str, given: bool) -> str:
    """The first line: the total this machine will need, and for which dtype."""
    size = f"{total / GB:.2f} GB" if total >= GB else f"{total / MB:.2f} MB"
    if given:
        return f"total: {size} in {dtype}, as --dtype asks; other setups in the table below\n"
    return (f"on this machine: {size} in {dtype}, what kdforge train runs on {where} and the figure preflight "
            "uses; other setups in the table below\n")


def model_path_answer(path: Path, hf_conf, setup: Setup, targets: list[str] | None, name: str,
                      request: MemoryRequest, where: str) -> str:
    """The answer for a `model.path` model (any local causal LM, traced from its own config)."""
    if request.vocab_size is not None:
        raise UsageError(f"--vocab-size: model.path ({path}) fixes its vocab in its config.json")
    args = (path, setup, targets)
    try:
        if request.as_json:
            return json.dumps(model_json(*args, name=name, conf=hf_conf), indent=2)
        total = estimate_model(*args, conf=hf_conf).total
        return lead(total, setup.dtype, where, request.dtype is not None) + model_report(*args, name=name, conf=hf_conf)
    except ValueError as e:  # PEFT: a target module not in the model; dropout on Mixtral's expert wrappers
        raise UsageError(f"{lora_field(e) if setup.lora else 'model.path'}: {e}") from None


def student_vocab(cfg: ModelCfg, name: str, request: MemoryRequest, tokenizer_dir: Path | None,
                  tokenizer_size: Callable[[Path], int]) -> tuple[int | None, list[str]]:
    """(the vocab a student that leaves it open gets, notes saying where it came from)."""
    vocab, notes = None, []
    if cfg.vocab_size is None:
        if request.vocab_size is not None:
            vocab = request.vocab_size
        elif tokenizer_dir is not None:
            vocab = tokenizer_size(tokenizer_dir)
            notes.append(f"vocab {vocab} from the tokenizer at {tokenizer_dir}")
        else:
            vocab = DEFAULT_VOCAB
            notes.append(f"{name} takes its vocab from the tokenizer; assumed {DEFAULT_VOCAB} "
                         "(pass --vocab-size N or --tokenizer DIR)")
    elif request.vocab_size is not None:
        raise UsageError(f"--vocab-size: {name} fixes its vocab at {cfg.vocab_size}")
    if vocab is not None and vocab <= 0:
        raise UsageError(f"--vocab-size must be positive, got {vocab}")
    return vocab, notes


def student_answer(cfg: ModelCfg, setup: Setup, name: str, request: MemoryRequest, where: str,
                   tokenizer_dir: Path | None, tokenizer_size: Callable[[Path], int]) -> str:
    """The answer for a student built from a preset or the config's numbers."""
    vocab, notes = student_vocab(cfg, name, request, tokenizer_dir, tokenizer_size)
    if request.as_json:
        return json.dumps(to_json(cfg, setup, vocab, name=name, notes=notes), indent=2)
    total = estimate(cfg, setup, vocab).total
    return lead(total, setup.dtype, where, request.dtype is not None) + report(cfg, setup, vocab, name=name,
                                                                                 notes=notes)
