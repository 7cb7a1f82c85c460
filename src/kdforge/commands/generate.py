"""CLI: `kdforge generate`, `kdforge data validate`, `kdforge data build`, `kdforge data inspect`.

Thin: parse flags, merge them over `--config`, call the library. Nothing heavy is imported
here: generate must not import torch or transformers (its first request goes out within
1.5 s of the start); only `data validate --tokenizer` loads transformers, lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

data_app = typer.Typer(help="Datasets: quality report, samples.", no_args_is_help=True)


def _generate_config(configs: list[str], flags: dict):
    """The generate section: config files merged left to right, then flags that were given.
    A problem with a value given as a flag is named by that flag (`--budget-limit`)."""
    from kdforge.config import load_section
    from kdforge.errors import ConfigError

    try:
        return load_section(configs, "generate", flags)
    except ConfigError as e:
        given = {f"generate.{k}" for k, v in flags.items() if v is not None}
        named = [(f"--{f.split('.', 1)[1].replace('_', '-')} ({f})" if f in given else f, m) for f, m in e.problems]
        raise ConfigError(named, e.source) from None


def generate(
    out: Optional[str] = typer.Option(None, "--out", help="output JSONL; re-running resumes it"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1"),
    model: Optional[str] = typer.Option(None, "--model", help="teacher model name"),
    total: Optional[int] = typer.Option(None, "--total", help="samples the file should hold"),
    budget_limit: Optional[float] = typer.Option(None, "--budget-limit", help="USD; never exceeded, counts across resumes"),
    checkpoint_dir: Optional[str] = typer.Option(None, "--checkpoint-dir", help="default: OUT's name + _checkpoints"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="default: CHECKPOINT_DIR/cache"),
    prompts: Optional[List[str]] = typer.Option(None, "--prompts", help="JSONL (prompt/messages) or text file; repeatable"),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="requests in flight at most (default 8)"),
    rpm: Optional[float] = typer.Option(None, "--rpm", help="requests/min (else learned from x-ratelimit headers)"),
    tpm: Optional[float] = typer.Option(None, "--tpm", help="tokens/min (else learned from x-ratelimit headers)"),
    delay: Optional[float] = typer.Option(None, "--delay", help="minimum seconds between request starts (default 0)"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="per answer (default 512)"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="default 0.7"),
    top_logprobs: Optional[int] = typer.Option(None, "--top-logprobs", help="store the teacher's top-K logprobs per token"),
    price_input: Optional[float] = typer.Option(None, "--price-input", help="USD per million input tokens"),
    price_output: Optional[float] = typer.Option(None, "--price-output", help="USD per million output tokens"),
    seed: Optional[int] = typer.Option(None, "--seed", help="prompt sampling order (default 0)"),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="environment variable holding the key "
                                                                           "(default OPENAI_API_KEY)"),
    config: Optional[List[str]] = typer.Option(None, "--config", help="YAML with a generate: section; repeatable"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and projected cost; send nothing"),
    batch: Optional[bool] = typer.Option(None, "--batch", help="use the provider's Batch API (half price at "
                                                               "OpenAI; results within 24 h)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="rows per batch file (default 1000)"),
    batch_discount: Optional[float] = typer.Option(None, "--batch-discount", help="batch price as a fraction of "
                                                   "the online price, where the price table has none (default 0.5)"),
    batch_fallback: Optional[str] = typer.Option(None, "--batch-fallback", help="retry failed or expired rows "
                                                 "'online' (default) or in the next 'batch' file"),
    batch_poll: Optional[float] = typer.Option(None, "--batch-poll", help="seconds before the first status poll "
                                                                          "(default 10; backs off to 60)"),
    cancel: bool = typer.Option(False, "--cancel", help="with --batch: cancel this run's open batches, keep what "
                                                        "they completed, release the rest of the budget held"),
    status: bool = typer.Option(False, "--status", help="with --batch: print the batch run's state; touch nothing"),
):
    """Call a teacher through any OpenAI-compatible API and write a KD dataset (JSONL)."""
    flags = dict(out=out, teacher=teacher, model=model, total=total, budget_limit=budget_limit,
                 checkpoint_dir=checkpoint_dir, cache_dir=cache_dir, prompts=prompts or None,
                 concurrency=concurrency, rpm=rpm, tpm=tpm, delay=delay, max_tokens=max_tokens,
                 temperature=temperature, top_logprobs=top_logprobs, price_input=price_input,
                 price_output=price_output, seed=seed, api_key_env=api_key_env, batch=batch,
                 batch_size=batch_size, batch_discount=batch_discount, batch_fallback=batch_fallback,
                 batch_poll=batch_poll)
    cfg = _generate_config(list(config or []), flags)
    from kdforge.errors import UsageError
    from kdforge.teacher.generate import run_generate

    if (cancel or status) and not cfg.batch:
        raise UsageError(f"{'--cancel' if cancel else '--status'} works on a batch run: add --batch "
                         "(with the same --out/--checkpoint-dir as the run)")
    if cancel and status:
        raise UsageError("--cancel and --status: pick one (--status first shows what --cancel would cancel)")
    run_generate(cfg, dry_run=dry_run, batch_action="cancel" if cancel else "status" if status else None)


@data_app.command("validate")
def data_validate(
    files: List[Path] = typer.Argument(..., help="JSONL files"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer folder for token lengths"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
):
    """Quality report per file; exit 2 if any line is unusable (each named file:line)."""
    from kdforge.data.quality import check_reports, render, validate_files

    reports = validate_files(files, tokenizer)
    if as_json:
        import json

        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        print(render(reports))
    check_reports(reports)


@data_app.command("build")
def data_build(
    files: List[Path] = typer.Argument(..., help="JSONL files (generate's output or any training format)"),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="the student's tokenizer folder"),
    max_seq_length: Optional[int] = typer.Option(None, "--max-seq-length", help="report examples longer than "
                                                 "this (the store keeps them whole; truncation is at read)"),
    out: Optional[Path] = typer.Option(None, "--out", help="store root (default: $KDFORGE_STORE_DIR, else "
                                       ".kdforge-store/ beside the first file, else the user cache)"),
    topk: Optional[bool] = typer.Option(None, "--topk/--no-topk", help="align teacher top-k rows (default: "
                                        "when the first record has teacher_logprobs)"),
):
    """Tokenise JSONL once into the memory-mapped token store train, eval and the daemon read."""
    from kdforge.data.store import build_command

    print(build_command(files, tokenizer, max_seq_length=max_seq_length, out=out, topk=topk))


@data_app.command("inspect")
def data_inspect(
    file: Path = typer.Argument(..., help="JSONL file"),
    n: int = typer.Option(3, "-n", "--n", help="how many samples"),
    width: int = typer.Option(100, "--width", help="characters shown of prompt and response"),
):
    """Show the first N samples: prompt, response, token counts."""
    from kdforge.data.inspect import inspect_file

    print(inspect_file(file, n, width))


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.add_typer(data_app, name="data")
