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
    student_tokenizer: str = typer.Option("teacher", "--student-tokenizer",
                                          help="own: one more on-policy student, on a tokenizer of its own (the "
                                               "teacher's rows carried onto its tokens by bytes)"),
):
    """Serve the shipped teacher, generate KD data from it, train three students (CE only, on-policy,
    CE + top-k KL; two with --fast, without the last; one more with --student-tokenizer own), compare them."""
    if student_tokenizer not in ("teacher", "own"):  # before the imports that take seconds
        from kdforge.errors import UsageError

        raise UsageError(f"--student-tokenizer {student_tokenizer!r}: use teacher (the default) or own")
    from kdforge.demo.run import run_demo

    run_demo(workdir, fast=fast, log=lambda m: print(m, flush=True), batch=batch, student_tokenizer=student_tokenizer)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
