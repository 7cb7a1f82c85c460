"""CLI: `kdforge tokenizer train`, `config validate`, `train`, `smoke`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

tokenizer_app = typer.Typer(help="Tokenizers.", no_args_is_help=True)
config_app = typer.Typer(help="Configs.", no_args_is_help=True)


@tokenizer_app.command("train")
def tokenizer_train(
    data: List[Path] = typer.Option(..., "--data", help="JSONL (any record format) or text files"),
    vocab_size: int = typer.Option(..., "--vocab-size"),
    out: Path = typer.Option(..., "--out"),
    min_frequency: int = typer.Option(2, "--min-frequency"),
):
    """Train a byte-level BPE tokenizer with a chat template (loadable by AutoTokenizer)."""
    from kdforge.data.tokenizer import texts_from_files, train_tokenizer

    tok = train_tokenizer(list(texts_from_files(data)), vocab_size, out, min_frequency=min_frequency)
    print(f"tokenizer: {len(tok)} tokens -> {out}")


@config_app.command("validate")
def config_validate(
    configs: List[Path] = typer.Argument(..., help="YAML files, merged left to right"),
    overrides: List[str] = typer.Option([], "--set", help="key=value overrides"),
):
    """Report every config problem at once, each naming its field (exit 2 if any)."""
    from kdforge.config import config_job
    from kdforge.config_checks import config_notes, validate_files

    cfg = validate_files(configs, overrides)  # a file alone: its shape says its job (config_job)
    for field, note in config_notes(cfg):
        print(f"note: {field}: {note}")
    names = ", ".join(str(c) for c in configs)
    if config_job(cfg) == "daemon":
        lora = f"LoRA r={cfg.model.lora.r}" if cfg.model.lora else "full training"
        print(f"ok: {names} (daemon on base model {cfg.daemon.base_model}, {lora})")
    elif cfg.model.path:
        print(f"ok: {names} (student {cfg.model.path})")
    else:
        mc = cfg.model.model_cfg()
        print(f"ok: {names} (student {mc.d_model}d x {mc.n_layers} layers, {mc.n_heads}/{mc.n_kv_heads} heads; "
              f"global batch {cfg.train.micro_batch_size}x{cfg.train.grad_accum})")




def train(
    config: List[Path] = typer.Option(..., "--config", "-c", help="YAML files, merged left to right"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="overrides io.output_dir"),
    resume: str = typer.Option("auto", "--resume",
                               help="auto (newest complete checkpoint in the output dir, if any), "
                                    "a checkpoint folder, or none"),
    overrides: List[str] = typer.Argument(None, help="section.key=value overrides, e.g. train.lr=1e-4"),
):
    """Train a student by knowledge distillation (torchrun-aware)."""
    from kdforge.config import load_config
    from kdforge.daemon.infra import machine_errors
    from kdforge.stdout import line_printer

    overrides = list(overrides or [])
    if output_dir is not None:
        overrides.append(f"io.output_dir={output_dir}")
    cfg = load_config(config, overrides)
    with machine_errors("kdforge train"):  # a full disk: one line, exit 1, not a traceback chain
        from kdforge.train.runner import run_training

        run_training(cfg, resume=resume, log=line_printer())  # `| tee` then Ctrl-C: the pipe breaks before the save


def smoke(workdir: Optional[Path] = typer.Option(None, "--workdir", help="default: a new temp dir")):
    """Toy end-to-end: toy data, tokenizer, model, 5 steps, checkpoint, resume to 10."""
    from kdforge.train.smoke import run_smoke

    run_smoke(workdir, log=lambda m: print(m, flush=True))


def register(app: typer.Typer) -> None:
    app.add_typer(tokenizer_app, name="tokenizer")
    app.add_typer(config_app, name="config")
    app.command("train")(train)
    app.command("smoke")(smoke)
