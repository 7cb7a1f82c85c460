"""CLI: `kdforge preflight`. Thin: parse, call `kdforge.preflight.run_preflight`, print the
report, exit 0 (nothing failed), 2 (a check failed) or 4 (the teacher refused us)."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer


def preflight(
    config: List[str] = typer.Option(..., "--config", help="the YAML config(s) you will train with; repeatable"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="teacher base URL (default: generate.teacher)"),
    model: Optional[str] = typer.Option(None, "--model", help="teacher model (default: generate.model)"),
    prompts: Optional[List[str]] = typer.Option(None, "--prompts", help="prompt files (default: generate.prompts "
                                                                        "or the built-in mix); repeatable"),
    budget_limit: float = typer.Option(1.0, "--budget-limit", help="USD the whole preflight may spend (never passed)"),
    samples: int = typer.Option(20, "--samples", help="samples to generate and train on"),
    only: str = typer.Option("pipeline", "--only", help="api, generation, budget, config, memory, training or "
                                                        "pipeline (all, in order)"),
    workdir: Optional[str] = typer.Option(None, "--workdir", help="scratch dir (default: a new temp dir)"),
    price_input: Optional[float] = typer.Option(None, "--price-input", help="USD per million input tokens"),
    price_output: Optional[float] = typer.Option(None, "--price-output", help="USD per million output tokens"),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="variable holding the key "
                                                                           "(default: generate.api_key_env)"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="per answer (default: "
                                             "generate.max_tokens, 512); prompt + this must fit the teacher's context"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    overrides: List[str] = typer.Argument(None, help="section.key=value overrides, e.g. generate.max_tokens=48"),
):
    """The seed plan's checklist on your own teacher, tokenizer and config, for under $1."""
    from kdforge.preflight import PreflightOptions, run_preflight
    from kdforge.preflight.report import render_json, render_text

    log = (lambda m: print(m, file=sys.stderr, flush=True))
    report = run_preflight(PreflightOptions(
        configs=list(config), teacher=teacher, model=model, prompts=list(prompts or []), budget_limit=budget_limit,
        samples=samples, only=only, workdir=workdir, price_input=price_input, price_output=price_output,
        api_key_env=api_key_env, max_tokens=max_tokens, overrides=list(overrides or []), log=log))
    print(render_json(report) if as_json else render_text(report), flush=True)
    if not as_json and report.kept:
        print(f"report: {report.workdir}/preflight_report.md", flush=True)
    return report.exit_code


def register(app: typer.Typer) -> None:
    app.command("preflight")(preflight)
