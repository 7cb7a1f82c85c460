"""CLI: `kdforge bench distill [--task NAME] [--budgets N...] [--seeds S] [--recipes R...] [--quick] [--out DIR]`.

Thin: build a `BenchPlan`, call `kdforge.bench.run_bench`, print the table; results.json,
table.md and one PNG per task land in --out.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import List, Optional

import typer

bench_app = typer.Typer(help="Benchmarks on shipped tasks and teachers.", no_args_is_help=True)


@bench_app.command("distill")
def distill_cmd(
    task: Optional[List[str]] = typer.Option(None, "--task", help="sort (near-certain teacher, exact match), lang (broad teacher, held-out KL) or langx (lang's teacher, a student with its own tokenizer: cross-tokenizer KD, held-out bits per byte); repeatable. Default: sort and lang."),
    budgets: Optional[List[int]] = typer.Option(None, "--budgets", min=1, help="Teacher answers per student; repeatable. Default: the headline cells at 100 and 250 (see --grid); with --grid 100 250 1000."),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="Seeds per cell (default 3)."),
    recipes: Optional[List[str]] = typer.Option(None, "--recipes", help="ce, topk_t1, topk_t2, dense, onpolicy_rkl, onpolicy_jsd; repeatable. Default: the headline cells (see --grid)."),
    grid: bool = typer.Option(False, "--grid", help="Every recipe at every budget, 100 250 1000 answers unless --budgets (108 cells, ~50 min on 2 cores; implied by --recipes or --budgets). The default runs the 21 headline cells the goals are read from in under 10 min (kdforge/bench/run.py DEFAULT)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimizer steps per student (default: sort 600, lang 300)."),
    jobs: int = typer.Option(2, "--jobs", min=1, help="Students trained at once, one torch thread each."),
    quick: bool = typer.Option(False, "--quick", help="Tiny: 1 budget (100), 1 seed, 20 steps, ce/topk_t1/onpolicy_rkl, both tasks (the test suite's run)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: a new temp dir)."),
) -> None:
    """Distillation recipes side by side over budgets and seeds: quality per teacher answer and per priced token."""
    from dataclasses import replace

    from kdforge.bench.report import plots, summarize, table
    from kdforge.bench.run import DEFAULT, GRID_BUDGETS, QUICK, run_bench

    plan = QUICK if quick else DEFAULT
    full = grid or bool(recipes) or bool(budgets)
    plan = replace(plan, tasks=task or plan.tasks, seeds=seeds or plan.seeds,
                   budgets=budgets or (GRID_BUDGETS if full and not quick else plan.budgets),
                   recipes=recipes or plan.recipes, jobs=jobs,
                   only=None if full else plan.only,
                   steps={t: steps for t in (task or plan.tasks)} if steps else plan.steps)
    out = out or Path(tempfile.mkdtemp(prefix="kdforge-bench-"))
    result = run_bench(plan, out, log=lambda m: typer.echo(m, err=True))
    rows = summarize(result)
    text = table(result, rows)
    (out / "table.md").write_text(text)
    pngs = plots(result, rows, out)
    typer.echo(text)
    cpu = sum(c.get("cpu_seconds", 0) for c in result["cells"])
    typer.echo(f"{len(result['cells'])} cells in {result['seconds']:.0f}s wall (load average "
               f"{result['load_average'][0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; the cells' CPU time "
               f"{cpu:.0f}s, {cpu / plan.jobs:.0f}s on {plan.jobs} idle cores); wrote {out / 'results.json'}, "
               f"{out / 'table.md'}, {', '.join(str(p) for p in pngs)}")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
