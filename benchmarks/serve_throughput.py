"""Completion tokens/s of `kdforge serve` beside `transformers serve` (and `--continuous-batching`).

    python benchmarks/serve_throughput.py [--models teacher,5m] [--max-tokens 32 128]
        [--seconds 5] [--repeats 3] [--threads 1] [--out FILE.json] [--quick]

Models: the shipped demo teacher (`src/kdforge/demo/assets/teacher/`, 1.3M parameters, a 64-token
context) and a ~5M-parameter Llama built here (kdforge's "small" shape with 7 layers, random
init, the demo teacher's tokenizer: gibberish text, real work per token); `--model DIR` instead
serves one given folder. Every server gets the same chat requests (greedy, each prompt
different) from `concurrency` clients that send their next request as soon as the last returns.

A cell runs for at least `--seconds` (then lets the requests in flight finish) and is repeated
`--repeats` times; the table gives the median tokens/s with its min-max, the mean completion
tokens per request (a server that stops at eos earlier does less work per request) and the
1-minute load average before the cell (the machine is shared: a load above the cores' count
means the cell ran on a busy machine). tokens/s = completion tokens (from `usage`) / wall time.
A cell whose prompt + max_tokens exceeds the model's context is left out (kdforge answers 400).

Scoring cells (kdforge serve only): `/v1/completions` with `echo: true`, `logprobs: 5`,
`max_tokens: 0`; tokens/s = prompt tokens scored / wall time. `--skip-scoring` leaves them out.

Goals (issue 12): kdforge >= 1.0x `transformers serve` at c=1 and >= 1.2x `transformers serve
--continuous-batching` at c=16; the ratios are printed below the table (medians over medians).
`--quick`: a smoke run (kdforge serve only, 1 repeat of 0.3 s, max_tokens 8) for the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_TEACHER = REPO / "src" / "kdforge" / "demo" / "assets" / "teacher"
KDFORGE = "kdforge serve"
TS, TS_CB = "transformers serve", "transformers serve --continuous-batching"
GOALS = ((1, TS, 1.0), (16, TS_CB, 1.2))  # (concurrency, rival, kdforge/rival tokens/s at least)


# ---- the models -----------------------------------------------------------------------------

def build_bench_model(out: Path) -> Path:
    """~5.1M parameters: the "small" shape (d_model 256, GQA 8/2) with 7 layers, vocab 300."""
    from kdforge.model import PRESETS, write_student

    return write_student(replace(PRESETS["small"], n_layers=7), EXAMPLE_TEACHER, out / "bench-5m", seed=0)


def n_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def context_len(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings") or 1 << 20


# ---- servers --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TransformersServe:
    """`transformers serve MODEL` in a subprocess; `why_not` says why it could not run."""

    def __init__(self, model_dir: Path, env: dict, extra: list[str], log: Path, timeout: float = 240):
        self.base_url, self.model, self.why_not, self.proc = None, str(model_dir), None, None
        exe = shutil.which("transformers")
        if exe is None:
            self.why_not = "no `transformers` command on PATH"
            return
        port = free_port()
        cmd = [exe, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *extra]
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.why_not = f"exited {self.proc.returncode}: {log.read_text(errors='replace')[-300:]!r}"
                return
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
                self.base_url = f"http://127.0.0.1:{port}/v1"
                return
            except httpx.HTTPError:
                time.sleep(0.5)
        self.why_not = f"not ready within {timeout:.0f}s"
        self.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ---- load -----------------------------------------------------------------------------------

def prompt(i: int) -> list[dict]:
    rng = random.Random(i)
    return [{"role": "user", "content": f"What is {rng.randint(0, 999)} plus {rng.randint(0, 999)}?"}]


def generation(model: str, i: int, max_tokens: int) -> tuple[str, dict, str]:
    return "chat/completions", {"model": model, "messages": prompt(i), "max_tokens": max_tokens,
                                "temperature": 0}, "completion_tokens"


def scoring(model: str, i: int, max_tokens: int) -> tuple[str, dict, str]:
    rng = random.Random(i)
    text = f"What is {rng.randint(0, 999)} plus {rng.randint(0, 999)}? Sort: golf alpha kilo delta."
    return "completions", {"model": model, "prompt": text, "echo": True, "logprobs": 5, "max_tokens": 0}, \
        "prompt_tokens"


async def run_cell(base_url: str, model: str, concurrency: int, seconds: float, max_tokens: int,
                   first: int, request=generation) -> tuple[int, int, float, str | None]:
    """(tokens, requests, wall seconds, first error): `concurrency` clients send requests back to
    back until `seconds` have passed; the wall time includes the requests then in flight."""
    nxt, tokens, done, err = first, 0, 0, None
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()

        async def worker() -> None:
            nonlocal nxt, tokens, done, err
            while time.perf_counter() - t0 < seconds and err is None:
                i, nxt = nxt, nxt + 1
                route, body, counted = request(model, i, max_tokens)
                r = await client.post(f"{base_url}/{route}", json=body)
                if r.status_code != 200:
                    err = f"HTTP {r.status_code}: {r.text[:200]}"
                    return
                tokens += r.json()["usage"][counted]
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return tokens, done, time.perf_counter() - t0, err


def measure(server: str, model_label: str, base_url: str, model: str, args, max_tokens: int,
            levels, request=generation, kind: str = "completion") -> list[dict]:
    """One row per concurrency level: `args.repeats` cells, the median and min-max tokens/s."""
    asyncio.run(run_cell(base_url, model, 2, 0.0, max_tokens, first=1_000_000, request=request))  # warm-up
    rows = []
    for c in levels:
        rates, per_req, loads, err = [], [], [], None
        for rep in range(args.repeats):
            loads.append(os.getloadavg()[0])
            tokens, n, wall, err = asyncio.run(run_cell(base_url, model, c, args.seconds, max_tokens,
                                                         first=100_000 * rep, request=request))
            if err:
                break
            rates.append(tokens / wall)
            per_req.append(tokens / max(n, 1))
        row = dict(model=model_label, server=server, kind=kind, max_tokens=max_tokens, concurrency=c,
                   median=statistics.median(rates) if rates else 0.0, min=min(rates, default=0.0),
                   max=max(rates, default=0.0), tokens_per_request=statistics.mean(per_req) if per_req else 0.0,
                   load=max(loads), repeats=len(rates), error=err)
        rows.append(row)
        print(f"  {model_label:<8} {server:<42} {kind:<10} mt={max_tokens:<4} c={c:<3} "
              f"{row['median']:8.1f} tok/s ({row['min']:.1f}-{row['max']:.1f}) load {row['load']:.2f}"
              + (f"  ERROR {err}" if err else ""), flush=True)
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """kdforge / rival median tokens/s at the goals' concurrency, per model and max_tokens."""
    by = {(r["model"], r["server"], r["kind"], r["max_tokens"], r["concurrency"]): r["median"] for r in rows}
    out = []
    for (model, server, kind, mt, c), ours in by.items():
        if server != KDFORGE or kind != "completion":
            continue
        for gc, rival, goal in GOALS:
            theirs = by.get((model, rival, kind, mt, c))
            if gc == c and theirs:
                out.append(dict(model=model, max_tokens=mt, concurrency=c, rival=rival, ratio=ours / theirs, goal=goal))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="serve this HF model folder only")
    ap.add_argument("--models", default="teacher,5m", help="comma list of: teacher, 5m")
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 16], help="concurrency levels")
    ap.add_argument("--seconds", type=float, default=5.0, help="minimum wall time of one cell")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each server")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-scoring", action="store_true", help="leave out the prompt-scoring cells")
    ap.add_argument("--out", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--quick", action="store_true", help="smoke run: kdforge only, 0.3 s x 1, max_tokens 8")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.repeats, args.max_tokens, args.skip_transformers = 0.3, 1, [8], True
        args.models = args.models if args.model else "teacher"

    sys.path.insert(0, str(REPO / "src"))
    from kdforge.serve import launch

    tmp = Path(tempfile.mkdtemp(prefix="kdforge-bench-serve-"))
    models = [("given", args.model.resolve())] if args.model else []
    for name in ([] if args.model else args.models.split(",")):
        models.append((name, EXAMPLE_TEACHER if name == "teacher" else build_bench_model(tmp)))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    load0 = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={args.threads}; load average at start "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; cells >= {args.seconds:g}s x {args.repeats}", flush=True)

    rows: list[dict] = []
    notes: list[str] = []
    for label, model_dir in models:
        ctx = context_len(model_dir)
        fits = [mt for mt in args.max_tokens if mt + 30 <= ctx]  # the chat prompts are 23-30 tokens
        notes += [f"{label}: max_tokens {mt} left out (context {ctx} tokens)" for mt in args.max_tokens if mt not in fits]
        print(f"model {label}: {model_dir} ({n_params(model_dir) / 1e6:.2f}M parameters, context {ctx})", flush=True)
        with launch(model_dir, env=env, log_path=tmp / f"kdforge-{label}.log") as server:
            for mt in fits:
                rows += measure(KDFORGE, label, server.base_url, server.model, args, mt, args.levels)
            if not args.skip_scoring:
                rows += measure(KDFORGE, label, server.base_url, server.model, args, 0, args.levels,
                                request=scoring, kind="scoring")
        for rival, extra in ((TS, []), (TS_CB, ["--continuous-batching"])):
            if args.skip_transformers:
                continue
            with TransformersServe(model_dir, env, extra, tmp / f"{label}-{rival.replace(' ', '_')}.log") as ts:
                if ts.why_not:
                    notes.append(f"{label}, {rival}: did not run ({ts.why_not})")
                    continue
                for mt in fits:
                    rows += measure(rival, label, ts.base_url, ts.model, args, mt, args.levels)

    load1 = os.getloadavg()
    print(f"\nload average at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} ({os.cpu_count()} CPUs)")
    print("| model | server | cell | max_tokens | concurrency | tokens/s median | min-max | tokens/request | load |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['server']} | {r['kind']} | {r['max_tokens']} | {r['concurrency']} | "
              f"{r['median']:.1f} | {r['min']:.1f}-{r['max']:.1f} | {r['tokens_per_request']:.1f} | {r['load']:.2f} |"
              + (f" error: {r['error']}" if r["error"] else ""))
    for note in notes:
        print(f"\n{note}")
    goals = ratios(rows)
    if goals:
        print("\n| model | max_tokens | concurrency | kdforge serve / | ratio | goal |")
        print("|---|---:|---:|---|---:|---|")
        for g in goals:
            print(f"| {g['model']} | {g['max_tokens']} | {g['concurrency']} | {g['rival']} | {g['ratio']:.2f}x | "
                  f">= {g['goal']:.1f}x {'met' if g['ratio'] >= g['goal'] else 'MISSED'} |")
    if args.out:
        args.out.write_text(json.dumps(dict(load_start=load0, load_end=load1, cpus=os.cpu_count(), rows=rows,
                                            ratios=goals, notes=notes), indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
