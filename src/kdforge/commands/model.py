"""CLI: `kdforge init-model` (a new random-init student) and `kdforge estimate-memory`.

Thin: resolve the model from `--preset` or `--config`, call `kdforge.model`, print. torch and
transformers are imported inside the commands, never at import time.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import List, Optional

import typer

from kdforge.errors import UsageError


def _source(preset: Optional[str], configs: List[Path], tokenizer: Optional[Path], job: str):
    """(ModelCfg, tokenizer dir or None, Config or None, name) from --preset or --config."""
    if preset and configs:
        raise UsageError("give --preset or --config, not both")
    if tokenizer is not None and not tokenizer.is_dir():
        raise UsageError(f"tokenizer folder not found: {tokenizer} "
                         f"(make one: kdforge tokenizer train --data FILE --vocab-size N --out {tokenizer})")

    from kdforge.model.shape import PRESETS, preset as get_preset

    if not preset and not configs:
        raise UsageError(f"give --preset NAME (one of {', '.join(PRESETS)}) or --config CFG")
    conf = None
    if preset:
        if preset not in PRESETS:
            raise UsageError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        cfg, name = get_preset(preset), f"preset {preset}"
    else:
        from kdforge.config import load_config

        conf = load_config(configs)
        name = ", ".join(str(c) for c in configs)
        if conf.model.path:
            if job == "init-model":
                raise UsageError(f"model.path ({conf.model.path}) names an existing model; init-model builds a "
                                 "new student from model.preset and the model numbers: remove model.path")
            # any local causal LM: estimate-memory builds it from its own config.json (fake tensors),
            # read once by _model_path_config
            return None, tokenizer, conf, f"{conf.model.path}"
        else:
            cfg = conf.model.model_cfg()
        if tokenizer is None and conf.io.tokenizer_path:
            tokenizer = Path(conf.io.tokenizer_path)
    problems = cfg.problems()
    if problems:
        raise UsageError("; ".join(f"model.{f}: {m}" for f, m in problems))
    if tokenizer is not None and not tokenizer.is_dir():
        raise UsageError(f"io.tokenizer_path: tokenizer folder not found: {tokenizer} "
                         f"(make one: kdforge tokenizer train --data FILE --vocab-size N --out {tokenizer})")
    return cfg, tokenizer, conf, name


def _model_path_config(path: Path):
    """The model's transformers config, or exit 2 naming model.path."""
    if not (path / "config.json").is_file():
        raise UsageError(f"model.path: no Hugging Face model folder (config.json) at {path}")
    from kdforge.model.memory import hf_config

    try:
        return hf_config(path)
    except (ValueError, KeyError, OSError) as e:
        raise UsageError(f"model.path: {path / 'config.json'} is not a config transformers can load ({e})") from None


def _tokenizer_size(tokenizer: Path) -> int:
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=False))
    except Exception as e:  # noqa: BLE001 - any load failure is a bad input folder
        raise UsageError(f"cannot load a tokenizer from {tokenizer}: {e}") from None


# ----------------------------------------------------------------------------- init-model

def init_model(
    preset: Optional[str] = typer.Option(None, "--preset", help="toy, small, 125m, 1b, 9b"),
    config: List[Path] = typer.Option([], "--config", help="kdforge YAML config(s); its model section"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer folder (default: io.tokenizer_path)"),
    out: Path = typer.Option(..., "--out", help="folder to write the Hugging Face model into"),
    seed: int = typer.Option(0, "--seed", help="initialisation seed"),
    force: bool = typer.Option(False, "--force", help="replace --out if it exists"),
):
    """Write a new random-init student as a Hugging Face model folder (with its tokenizer)."""
    cfg, tok_dir, _, name = _source(preset, config, tokenizer, "init-model")
    n_tok = _tokenizer_size(tok_dir) if tok_dir else None
    if cfg.vocab_size is None and n_tok is None:
        raise UsageError(f"{name} takes its vocabulary from the tokenizer: pass --tokenizer DIR "
                         "(make one: kdforge tokenizer train --data FILE --vocab-size N --out DIR)")
    if n_tok is not None and cfg.vocab_size is not None and cfg.vocab_size < n_tok:
        raise UsageError(f"model.vocab_size {cfg.vocab_size} is smaller than the tokenizer's {n_tok} tokens "
                         f"({tok_dir}): raise it or leave it unset to take the tokenizer's")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UsageError(f"--out {out} exists and is not empty: choose another folder or pass --force")

    from transformers.utils import logging as hf_logging

    from kdforge.model.student import write_student

    hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bar for a one-file model
    # Written aside, then renamed: the folder appears whole or not at all.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_student(cfg, tok_dir, tmp, seed=seed)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    c = cfg.resolved(n_tok)
    print(f"wrote {out}: {c.num_params():,} parameters ({name}: d_model {c.d_model}, {c.n_layers} layers, "
          f"{c.n_heads} heads ({c.n_kv_heads} kv) x {c.d_head}, ffn {c.ffn_dim}, vocab {c.vocab_size}), seed {seed}")
    if tok_dir is None:
        print("note: no tokenizer given, so none was saved beside the model")
    print(f"train it: set model.path: {out} in a config, then kdforge train --config CFG")


# ----------------------------------------------------------------------------- estimate-memory

def _machine_setup(conf):
    """(Setup, words): how `kdforge train` would run here, the setup preflight's memory item
    estimates: bf16 on a GPU, fp32 on a CPU, unless the config fixes model.dtype."""
    from kdforge.model.memory import Setup
    from kdforge.preflight.machine import training_setup, trains_on_gpu

    on_gpu = trains_on_gpu(conf.train.device if conf is not None else "auto")
    where = "this GPU" if on_gpu else "this CPU (no GPU)"
    if conf is None:
        return Setup(dtype="bfloat16" if on_gpu else "float32"), where
    return training_setup(conf, on_gpu), where


def estimate_memory(
    preset: Optional[str] = typer.Option(None, "--preset", help="toy, small, 125m, 1b, 9b"),
    config: List[Path] = typer.Option([], "--config", help="kdforge YAML config(s): model, train, lora"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="vocab for presets that take it from one"),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="vocab for presets that leave it open"),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="default: train.micro_batch_size or 1"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="default: max(train.seq_lengths) or 512"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: what kdforge train runs here: float32 on a CPU, bfloat16 on a GPU)"),
    optimizer_dtype: Optional[str] = typer.Option(None, "--optimizer-dtype",
                                                  help="AdamW moments; default: the weights' dtype"),
    master_weights: bool = typer.Option(False, "--master-weights", help="mixed precision: an fp32 master copy"),
    lora: Optional[bool] = typer.Option(None, "--lora/--no-lora", help="LoRA instead of full training"),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", help="LoRA rank (implies --lora; default 8)"),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
    attention: str = typer.Option("sdpa", "--attention", help="sdpa (also flash) or eager"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Parameters, weights, gradients, optimizer state, activations and total, with the formulas."""
    from kdforge.model.memory.request import MemoryRequest, model_path_answer, requested_setup, student_answer

    request = MemoryRequest(micro_batch=micro_batch, seq_len=seq_len, dtype=dtype, optimizer_dtype=optimizer_dtype,
                            master_weights=master_weights, lora=lora, lora_r=lora_r,
                            gradient_checkpointing=gradient_checkpointing, attention=attention,
                            vocab_size=vocab_size, as_json=as_json)
    cfg, tok_dir, conf, name = _source(preset, config, tokenizer, "estimate-memory")
    hf = _model_path_config(Path(conf.model.path)) if cfg is None else None  # validated, then traced
    machine, where = _machine_setup(conf)
    setup = requested_setup(machine, request, built_student=cfg is not None)
    if cfg is None:  # model.path: any local causal LM, traced from its own config
        targets = conf.model.lora.target_modules if conf.model.lora else None
        print(model_path_answer(Path(conf.model.path), hf, setup, targets, name, request, where))
    else:
        print(student_answer(cfg, setup, name, request, where, tok_dir, _tokenizer_size))


def register(app: typer.Typer) -> None:
    app.command("init-model")(init_model)
    app.command("estimate-memory")(estimate_memory)
