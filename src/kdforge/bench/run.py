"""`kdforge bench distill`: every (task, recipe, budget, seed) cell trained by `run_training`, scored,
and its spend counted two ways.

Spend of a cell:
- answers: teacher answers generated (the budget). With a local teacher, on-policy scoring is
  compute, not spend: this is the "per answer" regime.
- priced: what a paid API would bill at the fictitious PRICE_IN / PRICE_OUT: each answer costs its
  prompt tokens (chat template included) at the input price and its completion tokens (EOS
  included) at the output price; each on-policy step costs the tokens the teacher scored (prompt +
  the student's sample, summed from metrics.jsonl `teacher_tokens`) at the input price.

The teacher answers are made once per task (seed 0, the largest budget) and a budget of n takes
the first n, so budgets are nested; seeds vary the student's init, data order and on-policy draws.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from kdforge.bench import recipes as R
from kdforge.errors import UsageError
from kdforge.checkpoint_layout import checkpoint_folders
from kdforge.bench.tasks import (TASKS, Task, eval_file, load_teacher, score, student_tokenizer, teacher_answers,
                                  write_jsonl)

PRICE_IN, PRICE_OUT = 2.0, 8.0  # fictitious USD per million input / output tokens


@dataclass
class BenchPlan:
    tasks: list[str]
    budgets: list[int]
    seeds: int
    recipes: list[str]
    steps: dict[str, int] = field(default_factory=dict)  # per task; default Task.steps
    jobs: int = 2  # cells trained at once (one torch thread each)
    # (task, budget) -> the recipes run there; a pair not named runs every recipe. None: the full grid
    only: dict[tuple[str, int], list[str]] | None = None

    def recipes_at(self, task: str, budget: int) -> list[str]:
        """The recipes run for (task, budget): the plan's, within those the task runs at all."""
        runs = [r for r in self.recipes if TASKS[task].recipes is None or r in TASKS[task].recipes]
        if self.only is None or (task, budget) not in self.only:
            return runs
        return [r for r in runs if r in self.only[(task, budget)]]


# The default is the headline, sized to run in under 10 minutes on 2 cores: each cell of the full
# grid costs, in CPU seconds on one thread (measured 2026-12-02, `kdforge bench distill`, 66 cells,
# 3,314 CPU s, 29 min wall): sort (600 steps) CE / top-k 37-53, dense 86-95, on-policy JSD
# 113-137; lang (300 steps) CE 26-32, top-k 31-38, dense 41-47, on-policy JSD 71-72. The full grid
# (6 recipes x 3 budgets x 2 tasks x 3 seeds = 108 cells) is ~50 min there: `--grid`. The default
# keeps what the goals are read from, 3 seeds each (21 cells, ~980 CPU s; 24 with sort's top-5 KD
# took 596 s wall, over the 10 minutes):
# - sort at 250 answers: CE and on-policy JSD (the per-answer goal; on-policy JSD was the best
#   recipe there, reverse KL 2 points below it; top-k T=1/T=2 and dense within CE's spread);
# - lang at 100 and 250: CE and top-5 KD (the per-$ goal: top-k at equal $), and dense at 250 (the
#   best recipe wherever a local teacher exists).
DEFAULT = BenchPlan(tasks=["sort", "lang"], budgets=[100, 250], seeds=3, recipes=list(R.RECIPES),
                    only={("sort", 100): [],
                          ("sort", 250): ["ce", "onpolicy_jsd"],
                          ("lang", 100): ["ce", "topk_t1"],
                          ("lang", 250): ["ce", "topk_t1", "dense"],
                          # `--task langx` (not in the default: 6 cells, ~190 CPU s + its answers)
                          ("langx", 100): [],
                          ("langx", 250): ["ce", "topk_t1"]})
GRID_BUDGETS = [100, 250, 1000]  # `--grid`: every recipe at each of these budgets
ANSWER_BATCH = 50  # teacher answers generated per batch (budgets are cut at whole batches' answers)
QUICK = BenchPlan(tasks=["sort", "lang"], budgets=[100], seeds=1, recipes=["ce", "topk_t1", "onpolicy_rkl"],
                  steps={"sort": 20, "lang": 20})


def _usd(tokens_in: int, tokens_out: int) -> float:
    return (tokens_in * PRICE_IN + tokens_out * PRICE_OUT) / 1e6


# ----------------------------------------------------------------------------- one cell (a worker)

_TEACHERS: dict[str, tuple] = {}  # per worker process: each teacher loaded once


def _teacher(task: Task):
    if task.name not in _TEACHERS:
        _TEACHERS[task.name] = load_teacher(task)
    return _TEACHERS[task.name]


def run_cell(c: dict) -> dict:
    """Train, score and price one cell; `c` holds task, recipe, budget, seed, steps, paths."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.config import from_dict
    from kdforge.train.on_policy import on_policy_spend
    from kdforge.train.runner import run_training

    torch.set_num_threads(1)  # tiny models: a second thread costs more than it gives on shared cores
    t0, cpu0 = time.perf_counter(), time.process_time()
    task = TASKS[c["task"]]
    out = Path(c["out"])
    shutil.rmtree(out, ignore_errors=True)  # the bench's own cell folder: a rerun into --out starts afresh
    own = Path(c["tokenizer"]) if c.get("tokenizer") else None  # the student's own tokenizer (langx)
    cfg = from_dict(R.config(task, c["recipe"], Path(c["data"]), Path(c["pool"]), out, c["steps"], c["seed"],
                             tokenizer=own), c["recipe"])
    res = run_training(cfg, resume="none", log=lambda m: None)
    teacher, tok = _teacher(task)
    if own is not None:
        tok = AutoTokenizer.from_pretrained(str(own), trust_remote_code=False)
    student = AutoModelForCausalLM.from_pretrained(str(res.last_checkpoint), dtype=torch.float32,
                                                    trust_remote_code=False)
    q = score(task, student, tok, Path(c["eval"]), teacher if task.name == "lang" else None)
    op_steps, scored = on_policy_spend(out / "metrics.jsonl")
    for ck in checkpoint_folders(out):  # weights are not needed once scored: keep the bench folder small
        shutil.rmtree(ck, ignore_errors=True)
    usd = _usd(c["answer_in"] + scored, c["answer_out"])
    return {**{k: c[k] for k in ("task", "recipe", "budget", "seed", "steps")}, **q,
            "answers": c["budget"], "answer_tokens": c["answer_in"] + c["answer_out"],
            "scored_tokens": scored, "priced_tokens": c["answer_in"] + c["answer_out"] + scored,
            "usd": round(usd, 8), "on_policy_steps": op_steps, "seconds": round(time.perf_counter() - t0, 1),
            # CPU seconds: what the cell costs on an idle core (wall time grows with the machine's load)
            "cpu_seconds": round(time.process_time() - cpu0, 1)}


# ----------------------------------------------------------------------------- the whole bench

def _prepare(task: Task, budgets: list[int], work: Path, log) -> dict:
    """Teacher answers (the largest budget's, once), one train file per budget, the on-policy pool,
    the eval file and the teacher's own score."""
    teacher, tok = load_teacher(task)
    t0 = time.perf_counter()
    # whole chunks of ANSWER_BATCH: the first b answers are the same whichever budgets run with b
    n = -(-max(budgets) // ANSWER_BATCH) * ANSWER_BATCH
    rows = teacher_answers(teacher, tok, task.train_prompts(n), task.temperature, task.max_new_tokens,
                           seed=0, batch_size=ANSWER_BATCH, top_k=task.top_k)
    files = {}
    for b in budgets:
        part = rows[:b]
        files[b] = (write_jsonl(work / "data" / f"{task.name}-{b}.jsonl",
                                [{k: r[k] for k in ("prompt", "teacher_text", "teacher_logprobs")} for r in part]),
                    sum(r["usage"]["prompt_tokens"] for r in part), sum(r["usage"]["completion_tokens"] for r in part))
    pool = write_jsonl(work / "data" / f"{task.name}-pool.jsonl", [{"prompt": p} for p in task.pool()])
    ev = eval_file(task, work / "data", (teacher, tok))
    ref = score(task, teacher, tok, ev, teacher if task.name == "lang" else None)
    student_tok = student_tokenizer(task, work / "data")
    if task.own_merges is not None:  # what cross-tokenizer KD works with: the share of 1:1 positions
        ref["one_to_one"] = one_to_one_share(rows, student_tok)
    log(f"{task.name}: {max(budgets)} teacher answers in {time.perf_counter() - t0:.0f}s; teacher {ref}")
    return {"files": files, "pool": pool, "eval": ev, "teacher": ref,
            "tokenizer": str(student_tok) if task.own_merges is not None else None}


def one_to_one_share(rows: list[dict], tokenizer_dir: Path) -> float:
    """The share of the student's answer tokens whose teacher token is the same piece (same bytes
    at the same offset); the rest are carried across tokenizers (data/align.py)."""
    from transformers import AutoTokenizer

    from kdforge.data.align import StudentPieces, align_rows, teacher_tokens
    from kdforge.data.tokenizer import special_ids, token_bytes

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
    pieces = StudentPieces(token_bytes(tok), special_ids(tok))
    n = one = 0
    for r in rows:
        text = r["teacher_text"]
        a = align_rows(text.encode("utf-8"), tok(text, add_special_tokens=False)["input_ids"], pieces,
                       teacher_tokens(r["teacher_logprobs"]))
        n, one = n + a.positions, one + a.one_to_one
    return one / max(n, 1)


def _cost(c: dict) -> float:
    """A cell's training time, roughly, in CE steps (measured ratios on 2 cores)."""
    return c["steps"] * (4.4 if R.is_on_policy(c["recipe"]) else 2.7 if c["recipe"] == "dense" else 1.0) \
        * {"lang": 1.6, "langx": 3.0}.get(c["task"], 1.0)  # a lang step is ~1.6 sort steps (longer answers)


def _key(c: dict) -> tuple:
    return c["task"], c["recipe"], c["budget"], c["seed"], c["steps"]


def _finished(out: Path) -> list[dict]:
    """Cells of an earlier run into `out` priced at today's prices (else none: they would not compare)."""
    try:
        old = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return []
    same_price = (old.get("plan", {}).get("price_input"), old.get("plan", {}).get("price_output")) == (PRICE_IN, PRICE_OUT)
    return old.get("cells", []) if same_price else []


def _write(out: Path, result: dict, t0: float) -> None:
    result["seconds"] = round(time.perf_counter() - t0, 1)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out / "results.json")


def run_bench(plan: BenchPlan, out: Path, log=print) -> dict:
    """Run every cell of `plan` into `out`; returns (and writes out/results.json) the teacher
    references, the cells and the plan."""
    for r in plan.recipes:
        if r not in R.RECIPES:
            raise UsageError(f"unknown recipe {r!r}; choose from {', '.join(R.RECIPES)}")
    for t in plan.tasks:
        if t not in TASKS:
            raise UsageError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load = [round(x, 2) for x in os.getloadavg()]  # wall time is only comparable at a like load
    prepared = {t: _prepare(TASKS[t], plan.budgets, out, log) for t in plan.tasks}
    cells = []
    for t in plan.tasks:
        steps = plan.steps.get(t, TASKS[t].steps)
        p = prepared[t]
        for b in plan.budgets:
            data, tin, tout = p["files"][b]
            for r in plan.recipes_at(t, b):
                for s in range(plan.seeds):
                    cells.append({"task": t, "recipe": r, "budget": b, "seed": s, "steps": steps,
                                  "data": str(data), "pool": str(p["pool"]), "eval": str(p["eval"]),
                                  "answer_in": tin, "answer_out": tout, "tokenizer": p["tokenizer"],
                                  "out": str(out / "students" / f"{t}-{r}-{b}-s{s}")})
    # Longest cells first (on-policy, then dense, sort's 600 steps before lang's 300): the pool
    # does not end on a long straggler. Results are written after every cell.
    cells.sort(key=lambda c: -_cost(c))
    result = {"plan": {"tasks": plan.tasks, "budgets": plan.budgets, "seeds": plan.seeds, "recipes": plan.recipes,
                       "cells": {f"{t} {b}": plan.recipes_at(t, b) for t in plan.tasks for b in plan.budgets},
                       "steps": {t: plan.steps.get(t, TASKS[t].steps) for t in plan.tasks}, "jobs": plan.jobs,
                       "price_input": PRICE_IN, "price_output": PRICE_OUT, "teacher_answers": "in-process"},
              "teacher": {t: prepared[t]["teacher"] for t in plan.tasks}, "cells": [], "complete": False,
              "load_average": load}
    done = result["cells"]
    # A rerun into the same --out keeps the cells it already scored (same task, recipe, budget, seed, steps)
    kept = _finished(out)
    done += [r for r in kept if _key(r) in {_key(c) for c in cells}]
    cells = [c for c in cells if _key(c) not in {_key(r) for r in done}]
    if done:
        log(f"{len(done)} cells kept from {out / 'results.json'}, {len(cells)} to run")
    total = len(done) + len(cells)
    with ProcessPoolExecutor(max_workers=max(1, plan.jobs), mp_context=get_context("spawn")) as ex:
        futs = [ex.submit(run_cell, c) for c in cells]
        for f in as_completed(futs):
            r = f.result()
            done.append(r)
            log(f"  [{len(done)}/{total}] {r['task']} {r['recipe']} {r['budget']} answers seed {r['seed']}: "
                f"quality {r['quality']:.4f}, ${r['usd']:.4f}, {r['on_policy_steps']} on-policy steps, "
                f"{r['seconds']:.0f}s ({r.get('cpu_seconds', 0):.0f} CPU s)")
            _write(out, result, t0)  # after every cell: a long run stopped early still has its numbers
    done.sort(key=lambda r: (r["task"], R.RECIPES.index(r["recipe"]), r["budget"], r["seed"]))
    result["complete"] = True
    _write(out, result, t0)
    return result
