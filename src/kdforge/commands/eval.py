"""CLI: `kdforge eval MODEL_DIR --data FILE... [--teacher DIR|URL] [--json]` (see kdforge.eval).

Thin: parse, call `kdforge.eval.evaluate_model`, print. A rich table on a terminal, aligned plain
text otherwise; `--json` prints exactly one JSON object on stdout and nothing else there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

# (field, label, format) in the order shown
_ROWS = (("n", "records", "{:d}"), ("ce", "ce (nats/token)", "{:.4f}"), ("perplexity", "perplexity", "{:.3f}"),
         ("kl", "kl (teacher || student)", "{:.4f}"), ("exact_match", "exact match", "{:.1%}"),
         ("token_f1", "token F1", "{:.3f}"), ("accuracy", "accuracy", "{:.1%}"))


def _cells(d: dict) -> list[tuple[str, str, str]]:
    """(metric, value, note) rows; a number that was not measured reads '-', with why."""
    notes = {"ce": f"{d['tokens']} tokens, {d['n_scored']} records with a teacher text",
             "kl": (f"{d['kl_tokens']} tokens, teacher: {d['kl_teacher']}" if d["kl"] is not None
                    else "no teacher: no top-k in the data and no --teacher"),
             "exact_match": (f"{d['n_greedy']} greedy answers, at most {d['max_new_tokens']} new tokens"
                             if d["max_new_tokens"] else "no greedy answers (--no-greedy, or no prompts)"),
             "accuracy": f"{d['n_answer']} records with an answer" if d["n_answer"] else "no 'answer' field"}
    rows = []
    for key, label, fmt in _ROWS:
        v = d[key]
        rows.append((label, "-" if v is None else fmt.format(v), notes.get(key, "")))
    return rows


def _render(d: dict) -> None:
    rows = _cells(d)
    title = f"kdforge eval: {d['model']} on {', '.join(d['data'])} ({d['seconds']:.1f} s)"
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for col, just in (("metric", "left"), ("value", "right"), ("", "left")):
            table.add_column(col, justify=just)
        for r in rows:
            table.add_row(*r)
        Console().print(table)
        return
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(title)
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip())


class _Bar:
    """A rich progress bar on stderr when it is a terminal and not CI: one task per phase."""

    LABELS = {"teacher": "teacher scores", "score": "ce / kl", "answer": "greedy answers"}

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.tasks: dict[str, int] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(self.LABELS.get(phase, phase), total=total)
        self.bar.update(self.tasks[phase], completed=done)

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model_dir: Path = typer.Argument(..., help="Model folder, LoRA checkpoint-N/ or daemon current_model/checkpoint-N/."),
        data: List[Path] = typer.Option(..., "--data", help="Held-out KD data (JSONL, any record format; 'answer' fields count for accuracy)."),
        teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher model folder (dense KL; another tokenizer: its top-K carried onto the student's tokens) or URL of a server that scores tokens (kdforge serve, vLLM)."),
        teacher_model: Optional[str] = typer.Option(None, "--teacher-model", help="Model name at --teacher URL (default: its only one)."),
        top_k: int = typer.Option(20, "--top-k", help="Top-K logprobs asked of a --teacher URL (<= 20), or carried from a --teacher folder of another tokenizer."),
        api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Env var with the --teacher URL's API key, if it needs one."),
        base: Optional[str] = typer.Option(None, "--base", help="Base model folder of a LoRA MODEL_DIR (default: the one it names)."),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Greedy answer length (default: the longest teacher answer + 4, at most 512)."),
        max_records: Optional[int] = typer.Option(None, "--max-records", min=1, help="Score only the first N records."),
        batch_size: int = typer.Option(16, "--batch-size", min=1, help="Sequences per forward / generate batch."),
        no_greedy: bool = typer.Option(False, "--no-greedy", help="Skip greedy answers (no exact match, token F1, accuracy)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of the table."),
    ) -> None:
        """How close a student is to its teacher on held-out KD data: ce, perplexity, kl, exact match, token F1, accuracy."""
        from kdforge.eval import evaluate_model

        kw = dict(base=base, device=device, max_records=max_records, batch_size=batch_size,
                  max_new_tokens=max_new_tokens, greedy=not no_greedy, teacher_model=teacher_model, top_k=top_k,
                  api_key_env=api_key_env)
        if sys.stderr.isatty() and not os.environ.get("CI"):
            with _Bar() as bar:
                res = evaluate_model(model_dir, data, teacher, progress=bar, **kw)
        else:
            res = evaluate_model(model_dir, data, teacher, **kw)
        d = res.to_json()
        if as_json:
            sys.stdout.write(json.dumps(d) + "\n")
        else:
            _render(d)
