"""CLI: tokenizer train, init-model, config validate, estimate-memory, train, smoke."""

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
    from kdforge.config import validate_files

    validate_files(configs, overrides)
    print(f"ok: {', '.join(str(c) for c in configs)}")


def register(app: typer.Typer) -> None:
    app.add_typer(tokenizer_app, name="tokenizer")
    app.add_typer(config_app, name="config")
