"""CLI: `kdforge demo`, the whole pipeline on the shipped example, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def demo(
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="an empty or new folder (default: a temp dir)"),
    fast: bool = typer.Option(False, "--fast", help="smaller numbers (about a minute and a half)"),
    batch: bool = typer.Option(False, "--batch", help="teacher data through the Batch API (kdforge generate --batch), "
                                                      "at half the price"),
):
    """Serve the shipped teacher, generate KD data from it, train two students, compare them."""
    from kdforge.demo.run import run_demo

    run_demo(workdir, fast=fast, log=lambda m: print(m, flush=True), batch=batch)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
