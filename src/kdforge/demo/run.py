"""`kdforge demo`: the whole pipeline on the shipped example, offline, with nothing canned.

1. `kdforge serve` on the shipped teacher, on a free port of 127.0.0.1, with an API key;
2. `kdforge generate` against it: a scarce budget of train-split prompts (250: where recipes
   differ; with thousands every student reaches the teacher), a fictitious price and budget,
   top-k logprobs, the cache (a second pass answers every request from it);
3. `kdforge data validate` on the result;
4. students with <= 1/4 of the teacher's parameters, same shape and seed (`kdforge train`
   in-process): CE only; on-policy distillation (half the steps the student answers free prompts
   and the teacher, loaded in-process, scores its tokens: JSD); (not with --fast) CE + sparse
   top-k forward KL on the stored logprobs; and with `--student-tokenizer own` the on-policy
   recipe once more on a student with a tokenizer of its own (`demo/own.py`: the teacher scores
   its text in the teacher's tokens, rows carried back by bytes). Each prints its progress;
5. greedy exact-match accuracy of teacher and students on the held-out prompts;
6. a table, an honest verdict (the share of the CE-to-teacher gap on-policy closes, or "within the
   run-to-run spread"), `report.md` and `loss.png` in the work dir.

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
from kdforge.demo.own import own_tokenizer
from kdforge.demo.settings import FAST, FULL, DemoSettings
from kdforge.demo.task import evaluate, make_prompts
from kdforge.errors import KdforgeError, UsageError

PRICE_IN, PRICE_OUT = 1.0, 4.0  # fictitious USD per million tokens (the ledger needs a price)
BUDGET = 1.0  # USD: well above the run's cost, so the ledger is exercised but never binds
KEY_ENV = "KDFORGE_DEMO_KEY"


# The students. On-policy is the best recipe on this task at a scarce budget (`kdforge bench
# distill`); KD on the stored top-k is the classic one (not with --fast: its time goes to on-policy);
# student-own is on-policy with a tokenizer of its own (--student-tokenizer own).
STUDENTS = ("student-ce", "student-op", "student-kd", "student-own")
OWN = "student-own"
OWN_BYTES = "student-own-bytes"  # benchmarks/onpolicy_cross_tokenizer.py only: letters split from their space
PROGRESS_EVERY = 100  # steps between a student's progress lines


def students_of(s: DemoSettings, own: bool) -> list[str]:
    """The students a demo run trains, in table order."""
    return [n for n in STUDENTS if (n != "student-kd" or s.kd_student) and (n != OWN or own)]


def tokenizer_dir(work: Path, name: str) -> Path:
    """The student's tokenizer: the teacher's, or its own (demo/own.py), trained into the work dir once."""
    if name not in (OWN, OWN_BYTES):
        return TEACHER_DIR
    out = work / ("own_tokenizer" if name == OWN else "own_tokenizer_bytes")
    if not (out / "tokenizer.json").is_file():
        own_tokenizer(out, split_letters=name == OWN_BYTES)
    return out


def _student_config(s: DemoSettings, work: Path, data: Path, name: str, pool: Path, seed: int | None = None) -> dict:
    st = s.student
    cfg = {
        "model": {"preset": None, "d_model": st.d_model, "n_layers": st.n_layers, "n_heads": st.n_heads,
                  "n_kv_heads": st.n_kv_heads, "d_head": st.d_head, "ffn_dim": st.ffn_dim,
                  "max_seq_len": st.max_seq_len,
                  # an own tokenizer's student keeps the teacher-tokenizer student's embedding size (300)
                  **({"vocab_size": 300} if name in (OWN, OWN_BYTES) else {})},
        "io": {"tokenizer_path": str(tokenizer_dir(work, name)), "train_shards": [str(data)],
               "output_dir": str(work / "students" / name)},
        "loss": {"kind": "ce"},
        "train": {"micro_batch_size": s.batch_size, "grad_accum": 1, "seq_lengths": [st.max_seq_len],
                  "max_steps": s.steps, "lr": s.lr, "warmup_steps": s.warmup, "schedule": "cosine",
                  "min_lr_ratio": 0.1, "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0,
                  "save_steps": s.steps, "save_total_limit": 1, "seed": s.seed if seed is None else seed,
                  "log_steps": 10},
    }
    if name == "student-kd":
        cfg["loss"] = {"kind": "fkl", "kd_weight": s.kd_weight, "temperature": s.temperature}
    elif name in ("student-op", OWN, OWN_BYTES):
        # a dataset step is CE alone (kd_weight 0), an on-policy step the divergence alone
        cfg["loss"] = {"kind": "jsd", "kd_weight": 0.0, "beta": 0.5}
        cfg["teacher"] = {"path": str(TEACHER_DIR)}
        # own_tokenizer_bytes spells a spaced letter in 2 tokens: twice the room for the same answers
        tokens = s.on_policy_tokens * (2 if name == OWN_BYTES else 1)
        cfg["on_policy"] = {"fraction": s.on_policy_fraction, "max_new_tokens": tokens,
                            "temperature": 1.0, "prompts": [str(pool)]}
        cfg["train"]["log_steps"] = 1  # every step's record: the scored teacher tokens are summed from it
    return cfg


def _progress(name: str, log):
    """The run's plain progress lines ("step 100/600 loss ... eta 40s"), one in PROGRESS_EVERY
    steps and the last, prefixed with the student's name: step 4 is not minutes of silence."""
    import re

    def out(m: str) -> None:
        got = re.match(r"step (\d+)/(\d+) ", m)
        if got and (int(got.group(1)) % PROGRESS_EVERY == 0 or got.group(1) == got.group(2)):
            log(f"    {name}: {m}")
    return out


def train_student(fast: bool, work: str, data: str, name: str, pool: str, seed: int | None = None,
                  log=None) -> dict:
    """Train one student (`kdforge train` in-process) and score it: its table row, with its
    on-policy spend, final losses and CE curve. Top level, so that a spawned worker can run it.
    `seed`: the student's seed (default the settings'); `log`: where its progress lines go
    (default this process's stdout, which a worker shares with the demo)."""
    import torch
    from transformers.utils import logging as hf_logging

    from kdforge.config import from_dict
    from kdforge.train.on_policy import on_policy_spend
    from kdforge.train.runner import run_training

    torch.set_num_threads(1)  # tiny models: a second thread costs more than it gives on shared cores
    hf_logging.disable_progress_bar()  # no "Loading weights" bars between the demo's lines
    os.environ["CI"] = "1"  # plain progress lines: two workers' live bars would share one terminal
    s = FAST if fast else FULL
    t0 = time.perf_counter()
    cfg = from_dict(_student_config(s, Path(work), Path(data), name, Path(pool), seed), name)
    res = run_training(cfg, resume="none", log=_progress(name, log or (lambda m: print(m, flush=True))))
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    acc = _accuracy(res.last_checkpoint, load_eval(s.n_eval), s, tokenizer_dir(Path(work), name))
    op_steps, scored = on_policy_spend(res.output_dir / "metrics.jsonl")
    recs = [json.loads(x) for x in (res.output_dir / "metrics.jsonl").read_text().splitlines()]
    off = [r for r in recs if "ce" in r and not r.get("on_policy")]
    on = [r for r in recs if r.get("on_policy")]
    return {"model": name, "params": _n_params(res.last_checkpoint), "accuracy": acc,
            "tokens": res.state.tokens_seen, "seconds": seconds, "eval_seconds": time.perf_counter() - t1,
            # on-policy scoring priced as an API would bill it: the scored tokens at the input price
            "usd": scored * PRICE_IN / 1e6, "on_policy_steps": op_steps, "scored_tokens": scored,
            "steps": res.state.global_step,
            # the last logged CE of a dataset step (nats per target token) and, on-policy, the last
            # step's divergence on the student's own tokens (an on-policy step has no CE target)
            "final_ce": off[-1]["ce"] if off else None,
            "final_kd": on[-1].get("kd_on_policy", on[-1].get("kd")) if on else None,
            "curve": [(r["step"], r["ce"]) for r in off]}


def _student_line(r: dict) -> str:
    extra = (f", {r['on_policy_steps']} on-policy steps scoring {r['scored_tokens']:,} teacher tokens"
             if r["on_policy_steps"] else "")
    ce = r["final_ce"]  # a CE student overfits 250 answers to ~1e-5: "0.000" read as no loss at all
    losses = [f"final CE {ce:.3f} nats/token" if ce is not None and ce >= 1e-3 else
              f"final CE {ce:.1e} nats/token" if ce is not None else "",
              f"last on-policy JSD {r['final_kd']:.4f}" if r["final_kd"] is not None else ""]
    return (f"  {r['model']}: {r['steps']} steps{extra}, {r['tokens']:,} target tokens, {r['seconds']:.0f}s, "
            f"{', '.join(x for x in losses if x)}; exact match {r['accuracy']:.1%}")


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


def _accuracy(model_dir: Path, records: list[dict], s: DemoSettings, tok_dir: Path = TEACHER_DIR) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.demo.chat import greedy_answers

    tok = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, trust_remote_code=False)
    # own_tokenizer_bytes spells an answer in up to twice the teacher's tokens
    limit = s.max_new_tokens * (2 if "bytes" in tok_dir.name else 1)
    return evaluate(lambda ps: greedy_answers(model, tok, ps, limit), records)


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


def run_demo(workdir: str | Path | None = None, fast: bool = False, log=print, batch: bool = False,
             student_tokenizer: str = "teacher") -> dict:
    """Run the demo; returns the results table as a dict. Raises KdforgeError if a step fails.
    `batch`: the teacher data comes through the Batch API (kdforge generate --batch);
    `student_tokenizer` "own": one more on-policy student, on a tokenizer of its own."""
    from transformers.utils import logging as hf_logging

    import torch

    if student_tokenizer not in ("teacher", "own"):
        raise UsageError(f"--student-tokenizer {student_tokenizer!r}: use teacher or own")
    hf_logging.disable_progress_bar()  # no "Loading weights" bars between the demo's lines

    # ---------------------------------------------------------------- setup
    s = FAST if fast else FULL
    t_start = time.perf_counter()
    if "OMP_NUM_THREADS" not in os.environ:
        # The demo's models are tiny: a second thread buys little and, on a busy 2-core machine,
        # makes each step several times slower (measured: scripts/distill_feasibility.py).
        torch.set_num_threads(1)
    work = _new_workdir(workdir)
    info = teacher_info()
    students = students_of(s, student_tokenizer == "own")
    flags = f"{' --fast' if fast else ''}{' --batch' if batch else ''}"
    flags += " --student-tokenizer own" if student_tokenizer == "own" else ""
    log(f"kdforge demo{flags}: work dir {work}")
    log(f"task: sort letters (e.g. 'Sort: q d m a x' -> 'a d m q x'); teacher {info.get('parameters', '?'):,} "
        f"params; {s.n_samples} teacher answers (a scarce budget); "
        f"{len(students)} students x {s.steps} steps")
    prompts, pool = _write_prompts(work, s)
    os.environ[KEY_ENV] = secrets.token_hex(16)  # the server requires it; generate sends it
    times: dict[str, float] = {}

    # ---------------------------------------------------------------- teacher -> data
    gen = _teacher_data(work, s, prompts, log, batch)
    times["generate"] = gen["seconds"]

    # ---------------------------------------------------------------- students
    records = load_eval(s.n_eval)
    t0 = time.perf_counter()
    runs, acc_t = _train_students(s, fast, work, gen, pool, students, records, log)
    times["students"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- results
    log(f"[5/5] exact-match accuracy on {len(records)} held-out prompts ({EVAL_FILE.name})")
    rows = [{"model": "teacher", "params": _n_params(TEACHER_DIR), "accuracy": acc_t,
             "tokens": gen["prompt_tokens"] + gen["completion_tokens"], "usd": gen["cost_usd"],
             "seconds": times["generate"]}]
    rows += [runs[n] for n in students]
    times["eval"] = sum(r["eval_seconds"] for r in rows[1:])
    total = time.perf_counter() - t_start
    scored = (runs["student-op"]["on_policy_steps"], runs["student-op"]["scored_tokens"])

    by = {r["model"]: r for r in rows}
    ce, op = by["student-ce"], by["student-op"]
    table = _table(rows)
    for line in table.splitlines():
        log(line)
    verdict = _verdict(s, by["teacher"], ce, op, by.get("student-kd"), scored, by.get(OWN))
    for line in verdict:
        log(line)
    log(f"total wall time {total:.0f}s; report: {work / 'report.md'}")

    _plot({n: runs[n]["curve"] for n in students}, work / "loss.png")
    _report(work, s, fast, rows, table, verdict, gen, times, total, info, scored)
    gap = _gap(op["accuracy"], ce["accuracy"], acc_t)
    return {"rows": rows, "ratio_op": op["accuracy"] / acc_t if acc_t else 0.0,
            "ratio_ce": ce["accuracy"] / acc_t if acc_t else 0.0, "gap_closed": gap,
            "seconds": total, "workdir": str(work)}


def _new_workdir(workdir: str | Path | None) -> Path:
    """The demo's folder: the one given (it must be empty) or a new temp one (kept: it holds the report)."""
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kdforge-demo-"))
    if work.exists() and any(work.iterdir()):
        raise KdforgeError(f"--workdir {work} is not empty: give a new folder (the demo starts from nothing)")
    work.mkdir(parents=True, exist_ok=True)
    return work


def _write_prompts(work: Path, s) -> tuple[Path, Path]:
    """The prompts the teacher answers, and the on-policy pool: more train-split prompts, no answers
    (a prompt costs nothing until scored)."""
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"], "source": "sort"}) + "\n"
                               for r in make_prompts(s.n_samples, s.seed, "train")))
    pool = work / "on_policy_prompts.jsonl"
    pool.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n"
                            for r in make_prompts(s.n_pool, s.seed + 1, "train")))
    return prompts, pool


def _teacher_data(work: Path, s, prompts: Path, log, batch: bool) -> dict:
    """Steps 1-3: serve the teacher, generate its answers (online or through the Batch API), validate."""
    from kdforge.serve import launch

    log("[1/5] starting kdforge serve on the teacher (127.0.0.1, free port)")
    # One thread for the server: its batches of a 1M-parameter model gain nothing from a second,
    # and two threads spin against the generate client (and anything else) on a 2-core machine.
    with launch(TEACHER_DIR, env={**os.environ, "OMP_NUM_THREADS": "1"}, api_key_env=KEY_ENV,
                extra_args=["--batch-dir", str(work / "batches")] if batch else None) as server:
        log(f"  {server.base_url} (model {server.model})")
        log(f"[2/5] kdforge generate: {s.n_samples} answers, top-{s.top_k} logprobs, "
            f"${PRICE_IN}/${PRICE_OUT} per M tokens (fictitious), budget ${BUDGET}")
        gen = _generate(server, s, work, prompts, log, batch)
    log(f"  {gen['samples']} samples, {gen['completion_tokens']:,} completion tokens, ${gen['cost_usd']:.4f}; "
        "server stopped")
    log("[3/5] kdforge data validate")
    _validate(gen["path"], log)
    return gen


def _train_students(s, fast: bool, work: Path, gen: dict, pool: Path, students: list[str], records, log
                    ) -> tuple[dict[str, dict], float]:
    """Step 4: every student trained and scored, `jobs` at a time in forked workers while this process
    scores the teacher. Returns (results by student, the teacher's accuracy)."""
    what = {OWN: "on-policy as student-op, on a tokenizer of its own (demo/own.py: other merges and ids); the "
                 "teacher scores its text in the teacher's tokens, rows carried back onto its tokens by bytes",
            "student-ce": "CE on the teacher's answers only",
            "student-op": f"on-policy: on {s.on_policy_fraction:.0%} of steps the student answers {s.batch_size} "
                          "free prompts and the teacher (in-process) scores its tokens, JSD; other steps CE",
            "student-kd": f"CE + sparse top-{s.top_k} forward KL on the stored logprobs"}
    jobs = min(2, os.cpu_count() or 1, len(students))
    log(f"[4/5] training {len(students)} students x {s.steps} steps, {jobs} at a time (one thread each), "
        "each then scored on the held-out prompts:")
    for name in students:
        log(f"  {name}: {what[name]}")
    args = [(fast, str(work), str(gen["path"]), name, str(pool)) for name in students]
    runs: dict[str, dict] = {}
    if jobs <= 1:
        acc_t = _accuracy(TEACHER_DIR, records, s)
        for a in args:
            r = runs[a[3]] = train_student(*a)
            log(_student_line(r))
        return runs, acc_t
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_all_start_methods, get_context

    # fork where there is one: a worker starts with torch and kdforge imported (spawn re-imports
    # them, seconds of CPU each); this process has run no torch op on more than one thread
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer's pool does not fork
    ctx = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
    import kdforge.train.runner  # noqa: F401  (imported once, here, for the forked workers)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as ex:
        # on-policy (the longest) first: the other worker takes CE, then KD
        futs = [ex.submit(train_student, *a) for a in sorted(args, key=lambda a: a[3] not in ("student-op", OWN))]
        acc_t = _accuracy(TEACHER_DIR, records, s)  # meanwhile, here
        for f in as_completed(futs):
            r = f.result()
            runs[r["model"]] = r
            log(_student_line(r))
    return runs, acc_t


def _gap(q: float, ce: float, teacher: float) -> float | None:
    """Share of the CE-to-teacher gap closed: 0 is CE-only, 1 the teacher (None: no gap)."""
    return None if teacher - ce < 1e-9 else (q - ce) / (teacher - ce)


def _verdict(s: DemoSettings, teacher: dict, ce: dict, op: dict, kd: dict | None,
             scored: tuple[int, int], own: dict | None = None) -> list[str]:
    """What the numbers say, in sentences that do not claim more than one seed can show."""
    acc_t = teacher["accuracy"]
    n = f"{s.n_samples:,}"
    diff = op["accuracy"] - ce["accuracy"]
    gap = _gap(op["accuracy"], ce["accuracy"], acc_t)
    head = (f"with {n} teacher answers, on-policy distillation reaches {op['accuracy']:.1%} exact match, "
            f"CE-only {ce['accuracy']:.1%} (teacher {acc_t:.1%})")
    if abs(diff) <= s.ce_spread:
        lines = [f"{head}: a difference of {diff * 100:+.1f} points, within the run-to-run spread of CE "
                 f"across seeds at these settings ({s.ce_spread * 100:.0f} points): no win shown"]
    elif gap is None:
        lines = [f"{head}: CE-only already matches the teacher"]
    elif diff < 0:
        lines = [f"{head}: on-policy is worse than CE-only by {-diff * 100:.1f} points, beyond CE's "
                 f"seed-to-seed spread of {s.ce_spread * 100:.0f}"]
    else:
        lines = [f"{head}: on-policy closes {gap:.0%} of the CE-to-teacher gap "
                 f"({diff * 100:+.1f} points, beyond CE's seed-to-seed spread of {s.ce_spread * 100:.0f})"]
    if kd is not None:
        kgap = _gap(kd["accuracy"], ce["accuracy"], acc_t)
        kd_diff = kd["accuracy"] - ce["accuracy"]
        kd_says = ("within CE's spread: the near-certain teacher's top-5 adds little beyond its text"
                   if abs(kd_diff) <= s.ce_spread else f"{kgap:.0%} of the gap" if kgap is not None else "")
        lines.append(f"CE + top-{s.top_k} KL on the same answers: {kd['accuracy']:.1%} ({kd_says})")
    ratio = op["accuracy"] / acc_t if acc_t else 0.0
    lines.append(f"on-policy student: {ratio:.0%} of the teacher's accuracy with {op['params'] / teacher['params']:.0%} "
                 f"of its parameters ({'meets' if ratio >= 0.9 else 'misses'} the 90% goal); it cost "
                 f"{scored[0]} on-policy steps whose {scored[1]:,} scored teacher tokens would be "
                 f"${scored[1] * PRICE_IN / 1e6:.4f} at the fictitious input price (here the teacher is local)")
    if own is not None:
        share = own["accuracy"] / op["accuracy"] if op["accuracy"] else 0.0
        lines.append(f"student-own (its own tokenizer, the teacher's rows carried by bytes): {own['accuracy']:.1%}, "
                     f"{share:.0%} of the same-tokenizer on-policy student's")
    lines.append(f"one seed per student (seed {s.seed}): numbers move by several points from seed to seed "
                 "(README 'The demo' gives the spread; benchmarks/onpolicy_cross_tokenizer.py, `kdforge bench distill`)")
    return lines


def _table(rows: list[dict]) -> str:
    head = "| model | parameters | exact match | tokens | $ (fictitious) | wall time |\n|---|---:|---:|---:|---:|---:|"
    body = [f"| {r['model']} | {r['params']:,} | {r['accuracy']:.1%} | {r['tokens']:,} | {r['usd']:.4f} | "
            f"{r['seconds']:.0f}s |" for r in rows]
    return "\n".join([head, *body])


def _report(work: Path, s: DemoSettings, fast: bool, rows, table, verdict, gen, times, total, info,
            scored: tuple[int, int]) -> None:
    kd = ("; `student-kd` learns from the teacher's text and its top-{k} distribution per token "
          "(loss = {a:g} x CE + {b:g} x forward KL, T={t:g})").format(
        k=s.top_k, a=1 - s.kd_weight, b=s.kd_weight, t=s.temperature) if s.kd_student else ""
    lines = [
        f"# kdforge demo{' (--fast)' if fast else ''}",
        "",
        "Task: sort 3-8 distinct lowercase letters (`Sort: q d m a x` -> `a d m q x`), checked by exact "
        "match on held-out letter sets that never appear in training.",
        "",
        table,
        "",
        *[f"- {v}." for v in verdict],
        "",
        "- Teacher: the shipped model (`kdforge/demo/assets/teacher`), served by `kdforge serve` over HTTP "
        "for the answers; the on-policy student's scoring loads it in-process (dense logits).",
        f"- Data: {gen['samples']} answers from `kdforge generate` at temperature 0 with top-{s.top_k} "
        f"logprobs, {gen['prompt_tokens']:,} prompt + {gen['completion_tokens']:,} completion tokens, "
        f"${gen['cost_usd']:.4f} at a fictitious ${PRICE_IN}/${PRICE_OUT} per million tokens "
        f"({times['generate']:.0f}s). A scarce budget on purpose: with thousands of answers CE alone "
        "reaches the teacher and no recipe can show anything.",
        f"- Students: identical shape and seed, {s.steps} steps of {s.batch_size} sequences, AdamW lr {s.lr}, "
        f"cosine; `student-ce` learns from the teacher's text only; `student-op` trains CE on the "
        f"answers on about {1 - s.on_policy_fraction:.0%} of its steps and, on the others "
        f"({scored[0]} here), samples its own answers (T 1, <= {s.on_policy_tokens} tokens) to "
        f"{s.batch_size} of {s.n_pool:,} free train-split prompts, which the teacher scores "
        f"({scored[1]:,} tokens in all): generalized JSD (beta 0.5) on its own tokens{kd}.",
        *([f"- `student-own`: `student-op`'s recipe on a tokenizer of its own (`{tokenizer_dir(work, OWN).name}/`, "
           "trained by `demo/own.py`: other merges and ids); the teacher scores its text in the teacher's own "
           "tokens and its top-20 rows are carried onto the student's tokens by bytes (`train/cross_scoring.py`)."]
          if any(r["model"] == OWN for r in rows) else []),
        f"- $ of a student: what its teacher scoring would cost at the fictitious input price "
        f"(${PRICE_IN}/M); the answers' $ is on the teacher row. Tokens for a student = target tokens trained "
        f"on; wall time of evaluation {times['eval']:.0f}s; whole demo {total:.0f}s.",
        "",
        "![training loss](loss.png)",
        "",
    ]
    (work / "report.md").write_text("\n".join(lines))
