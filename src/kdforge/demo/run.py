"""`kdforge demo`: the whole pipeline on the shipped example, offline, with nothing canned.

1. `kdforge serve` on the shipped teacher, on a free port of 127.0.0.1, with an API key;
2. `kdforge generate` against it: train-split prompts, a fictitious price and budget, top-k
   logprobs, the cache (a second pass answers every request from it);
3. `kdforge data validate` on the result;
4. two students with <= 1/4 of the teacher's parameters, same shape and seed: CE only, and
   CE + sparse top-k forward KL on the stored logprobs (`kdforge train` in-process);
5. greedy exact-match accuracy of teacher and students on the held-out prompts;
6. a table, `report.md` and `loss.png` in the work dir.

The server is stopped on every exit path, Ctrl-C included.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kdforge.demo import EVAL_FILE, TEACHER_DIR, load_eval, teacher_info
from kdforge.demo.settings import FAST, FULL, DemoSettings
from kdforge.demo.task import evaluate, make_prompts
from kdforge.errors import KdforgeError

PRICE_IN, PRICE_OUT = 1.0, 4.0  # fictitious USD per million tokens (the ledger needs a price)
BUDGET = 1.0  # USD: well above the run's cost, so the ledger is exercised but never binds
KEY_ENV = "KDFORGE_DEMO_KEY"


def _student_config(s: DemoSettings, work: Path, data: Path, name: str, kind: str) -> dict:
    st = s.student
    return {
        "model": {"preset": None, "d_model": st.d_model, "n_layers": st.n_layers, "n_heads": st.n_heads,
                  "n_kv_heads": st.n_kv_heads, "d_head": st.d_head, "ffn_dim": st.ffn_dim,
                  "max_seq_len": st.max_seq_len},
        "io": {"tokenizer_path": str(TEACHER_DIR), "train_shards": [str(data)],
               "output_dir": str(work / "students" / name)},
        "loss": {"kind": kind, "kd_weight": s.kd_weight, "temperature": s.temperature},
        "train": {"micro_batch_size": s.batch_size, "grad_accum": 1, "seq_lengths": [st.max_seq_len],
                  "max_steps": s.steps, "lr": s.lr, "warmup_steps": s.warmup, "schedule": "cosine",
                  "min_lr_ratio": 0.1, "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0,
                  "save_steps": s.steps, "save_total_limit": 1, "seed": s.seed, "log_steps": 10},
    }


def _generate(server, s: DemoSettings, work: Path, prompts: Path, log, batch: bool = False) -> dict:
    data = work / "data" / "kd.jsonl"
    cmd = [sys.executable, "-m", "kdforge", "generate", "--out", str(data), "--teacher", server.base_url,
           "--model", server.model, "--total", str(s.n_samples), "--prompts", str(prompts),
           "--budget-limit", str(BUDGET), "--price-input", str(PRICE_IN), "--price-output", str(PRICE_OUT),
           "--top-logprobs", str(s.top_k), "--max-tokens", str(s.max_new_tokens), "--temperature", "0",
           "--concurrency", "32", "--seed", str(s.seed), "--api-key-env", KEY_ENV,
           "--checkpoint-dir", str(work / "data" / "checkpoints"), "--cache-dir", str(work / "data" / "cache")]
    if batch:  # through the server's Batch API, at half the price: files of 500, polled every 0.5 s or more
        cmd += ["--batch", "--batch-size", "500", "--batch-poll", "0.5"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if p.returncode != 0:
        raise KdforgeError(f"kdforge generate failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    for line in p.stdout.strip().splitlines()[-8:]:
        log(f"  {line}")
    rows = [json.loads(x) for x in data.read_text().splitlines() if x.strip()]
    meta = [r["metadata"] for r in rows]
    return {"path": data, "samples": len(rows), "seconds": time.perf_counter() - t0,
            "completion_tokens": sum(m["tokens"]["completion"] for m in meta),
            "prompt_tokens": sum(m["tokens"]["prompt"] for m in meta),
            "cost_usd": sum(m.get("cost_usd", 0.0) for m in meta)}


def _validate(data: Path, log) -> None:
    from kdforge.data.quality import check_reports, render, validate_files

    reports = validate_files([data], TEACHER_DIR)
    for line in render(reports).splitlines()[:12]:
        log(f"  {line}")
    check_reports(reports)


def _accuracy(model_dir: Path, records: list[dict], s: DemoSettings) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.demo.chat import greedy_answers

    tok = AutoTokenizer.from_pretrained(str(TEACHER_DIR))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return evaluate(lambda ps: greedy_answers(model, tok, ps, s.max_new_tokens), records)


def _n_params(model_dir: Path) -> int:
    from safetensors import safe_open

    import math

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (CE part, nats/token)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(workdir: str | Path | None = None, fast: bool = False, log=print, batch: bool = False) -> dict:
    """Run the demo; returns the results table as a dict. Raises KdforgeError if a step fails.
    `batch`: the teacher data comes through the Batch API (kdforge generate --batch)."""
    from kdforge.config import from_dict
    from kdforge.serve import launch
    from kdforge.train.runner import run_training

    import torch

    s = FAST if fast else FULL
    t_start = time.perf_counter()
    if "OMP_NUM_THREADS" not in os.environ:
        # The demo's models are tiny: a second thread buys little and, on a busy 2-core machine,
        # makes each step several times slower (measured: scripts/distill_feasibility.py).
        torch.set_num_threads(1)
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kdforge-demo-"))
    if work.exists() and any(work.iterdir()):
        raise KdforgeError(f"--workdir {work} is not empty: give a new folder (the demo starts from nothing)")
    work.mkdir(parents=True, exist_ok=True)
    info = teacher_info()
    log(f"kdforge demo{' --fast' if fast else ''}{' --batch' if batch else ''}: work dir {work}")
    log(f"task: sort letters (e.g. 'Sort: q d m a x' -> 'a d m q x'); teacher {info.get('parameters', '?'):,} "
        f"params; {s.n_samples} teacher answers; 2 students x {s.steps} steps")

    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"], "source": "sort"}) + "\n"
                               for r in make_prompts(s.n_samples, s.seed, "train")))
    os.environ[KEY_ENV] = secrets.token_hex(16)  # the server requires it; generate sends it
    times: dict[str, float] = {}

    # ---------------------------------------------------------------- teacher -> data
    log("[1/5] starting kdforge serve on the teacher (127.0.0.1, free port)")
    # One thread for the server: its batches of a 1M-parameter model gain nothing from a second,
    # and two threads spin against the generate client (and anything else) on a 2-core machine.
    with launch(TEACHER_DIR, env={**os.environ, "OMP_NUM_THREADS": "1"}, api_key_env=KEY_ENV,
                extra_args=["--batch-dir", str(work / "batches")] if batch else None) as server:
        log(f"  {server.base_url} (model {server.model})")
        log(f"[2/5] kdforge generate: {s.n_samples} answers, top-{s.top_k} logprobs, "
            f"${PRICE_IN}/${PRICE_OUT} per M tokens (fictitious), budget ${BUDGET}")
        gen = _generate(server, s, work, prompts, log, batch)
        times["generate"] = gen["seconds"]
    log(f"  {gen['samples']} samples, {gen['completion_tokens']:,} completion tokens, ${gen['cost_usd']:.4f}; "
        "server stopped")

    log("[3/5] kdforge data validate")
    _validate(gen["path"], log)

    # ---------------------------------------------------------------- two students
    runs = {}
    for name, kind in (("student-ce", "ce"), ("student-kd", "fkl")):
        log(f"[4/5] training {name} ({'CE only' if kind == 'ce' else f'CE + sparse top-{s.top_k} forward KL'})")
        t0 = time.perf_counter()
        cfg = from_dict(_student_config(s, work, gen["path"], name, kind), name)
        res = run_training(cfg, resume="none", log=lambda m: None)
        times[name] = time.perf_counter() - t0
        runs[name] = res
        last = res.state.log_history
        log(f"  {res.state.global_step} steps, {res.state.tokens_seen:,} target tokens, "
            f"{times[name]:.0f}s, final loss {[h['loss'] for h in last if 'loss' in h][-1]:.4f}")

    # ---------------------------------------------------------------- evaluation
    records = load_eval(s.n_eval)
    log(f"[5/5] exact-match accuracy on {len(records)} held-out prompts ({EVAL_FILE.name})")
    rows = []
    t0 = time.perf_counter()
    acc_t = _accuracy(TEACHER_DIR, records, s)
    rows.append({"model": "teacher", "params": _n_params(TEACHER_DIR), "accuracy": acc_t,
                 "tokens": gen["prompt_tokens"] + gen["completion_tokens"], "usd": gen["cost_usd"],
                 "seconds": times["generate"]})
    for name, res in runs.items():
        acc = _accuracy(res.last_checkpoint, records, s)
        rows.append({"model": name, "params": _n_params(res.last_checkpoint), "accuracy": acc,
                     "tokens": res.state.tokens_seen, "usd": 0.0, "seconds": times[name]})
    times["eval"] = time.perf_counter() - t0
    total = time.perf_counter() - t_start

    kd = next(r for r in rows if r["model"] == "student-kd")
    ce = next(r for r in rows if r["model"] == "student-ce")
    ratio_kd = kd["accuracy"] / acc_t if acc_t else 0.0
    ratio_ce = ce["accuracy"] / acc_t if acc_t else 0.0
    table = _table(rows)
    for line in table.splitlines():
        log(line)
    verdict = (f"distilled student: {ratio_kd:.0%} of the teacher's accuracy with "
               f"{kd['params'] / rows[0]['params']:.0%} of its parameters "
               f"({'meets' if ratio_kd >= 0.9 else 'misses'} the 90% goal); CE-only student: {ratio_ce:.0%}")
    log(verdict)
    log(f"total wall time {total:.0f}s; report: {work / 'report.md'}")

    curves = {}
    for name, res in runs.items():
        pts = [(json.loads(x)["step"], json.loads(x)["ce"]) for x in
               (res.output_dir / "metrics.jsonl").read_text().splitlines() if '"ce"' in x]
        curves[name] = pts
    _plot(curves, work / "loss.png")
    _report(work, s, fast, rows, table, verdict, gen, times, total, info)
    return {"rows": rows, "ratio_kd": ratio_kd, "ratio_ce": ratio_ce, "seconds": total, "workdir": str(work)}


def _table(rows: list[dict]) -> str:
    head = "| model | parameters | exact match | tokens | $ (fictitious) | wall time |\n|---|---:|---:|---:|---:|---:|"
    body = [f"| {r['model']} | {r['params']:,} | {r['accuracy']:.1%} | {r['tokens']:,} | {r['usd']:.4f} | "
            f"{r['seconds']:.0f}s |" for r in rows]
    return "\n".join([head, *body])


def _report(work: Path, s: DemoSettings, fast: bool, rows, table, verdict, gen, times, total, info) -> None:
    lines = [
        f"# kdforge demo{' (--fast)' if fast else ''}",
        "",
        "Task: sort 3-8 distinct lowercase letters (`Sort: q d m a x` -> `a d m q x`), checked by exact "
        "match on held-out letter sets that never appear in training.",
        "",
        table,
        "",
        verdict + ".",
        "",
        f"- Teacher: the shipped model (`kdforge/demo/assets/teacher`), served by `kdforge serve` over HTTP.",
        f"- Data: {gen['samples']} answers from `kdforge generate` at temperature 0 with top-{s.top_k} "
        f"logprobs, {gen['prompt_tokens']:,} prompt + {gen['completion_tokens']:,} completion tokens, "
        f"${gen['cost_usd']:.4f} at a fictitious ${PRICE_IN}/${PRICE_OUT} per million tokens "
        f"({times['generate']:.0f}s).",
        f"- Students: identical shape and seed, {s.steps} steps of {s.batch_size} sequences, AdamW lr {s.lr}, "
        f"cosine; `student-ce` learns from the teacher's text only, `student-kd` also from its top-{s.top_k} "
        f"distribution per token (loss = {1 - s.kd_weight:g} x CE + {s.kd_weight:g} x forward KL, T={s.temperature:g}).",
        f"- Tokens for a student = target tokens trained on; wall time of evaluation {times['eval']:.0f}s; "
        f"whole demo {total:.0f}s.",
        "",
        "![training loss](loss.png)",
        "",
    ]
    (work / "report.md").write_text("\n".join(lines))
