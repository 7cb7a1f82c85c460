"""Completion tokens/s of `kdforge serve` at concurrency 1, 4 and 16, beside `transformers serve`.

    python benchmarks/serve_throughput.py [--model DIR] [--max-tokens 64] [--threads 1]

The model: `--model DIR`; else the shipped example teacher (`src/kdforge/demo/assets/teacher/`)
when present; else a ~5M-parameter Llama (kdforge's "small" shape, 6 layers) with a byte-level BPE
tokenizer trained here on synthetic text, in a temporary folder (random weights: the text is
gibberish, the work per token is real). Both servers get the same chat requests (greedy, each
prompt different) from `concurrency` clients that send their next request as soon as the last
returns; tokens/s = completion tokens (from `usage`) / wall time. Each server runs in its own
process with OMP_NUM_THREADS=--threads, offline (HF_HUB_OFFLINE=1). Goal: kdforge at
concurrency 16 >= 3x its concurrency-1 rate, and ahead of `transformers serve`.

Scoring cells (kdforge serve only): the same levels for `/v1/completions` with `echo: true`,
`logprobs: 5`, `max_tokens: 0` (each prompt a short chat-like text); tokens/s = prompt tokens
scored (from `usage`) / wall time. `--skip-scoring` leaves them out.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_TEACHER = REPO / "src" / "kdforge" / "demo" / "assets" / "teacher"
LEVELS = (1, 4, 16)


# ---- the model ------------------------------------------------------------------------------

def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        ws = rng.sample(words, 4)
        out += [f"What is {a} plus {b}? {a} plus {b} is {a + b}.", f"Sort these words: {' '.join(ws)}",
                " ".join(sorted(ws))]
    return out


def build_bench_model(out: Path) -> Path:
    """A ~5M-parameter Llama (the "small" shape with 6 layers) with a trained BPE tokenizer."""
    from dataclasses import replace

    from kdforge.data.tokenizer import train_tokenizer
    from kdforge.model import PRESETS, write_student

    train_tokenizer(synthetic_texts(3000), 4096, out / "tokenizer", min_frequency=2)
    return write_student(replace(PRESETS["small"], n_layers=6), out / "tokenizer", out / "bench-model", seed=0)


def n_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


# ---- servers --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TransformersServe:
    """`transformers serve MODEL` in a subprocess; `why_not` says why it could not run."""

    def __init__(self, model_dir: Path, env: dict, extra: list[str], log: Path, timeout: float = 240):
        self.base_url, self.model_id, self.why_not, self.proc = None, str(model_dir), None, None
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
    text = " ".join(m["content"] for m in prompt(i)) + " " + synthetic_texts(1, seed=i)[0]
    return "completions", {"model": model, "prompt": text, "echo": True, "logprobs": 5, "max_tokens": 0}, \
        "prompt_tokens"


async def run_level(base_url: str, model: str, concurrency: int, n_requests: int, max_tokens: int,
                    first: int = 0, request=generation) -> tuple[int, float, str | None]:
    """(tokens, wall seconds, first error) for `n_requests` over `concurrency` clients; which
    tokens (completion or prompt) `request` says."""
    nxt, tokens, err = first, 0, None

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal nxt, tokens, err
        while nxt < first + n_requests and err is None:
            i, nxt = nxt, nxt + 1
            route, body, counted = request(model, i, max_tokens)
            r = await client.post(f"{base_url}/{route}", json=body)
            if r.status_code != 200:
                err = f"HTTP {r.status_code}: {r.text[:200]}"
                return
            tokens += r.json()["usage"][counted]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return tokens, time.perf_counter() - t0, err


def measure(name: str, base_url: str, model: str, args, request=generation) -> list[tuple]:
    asyncio.run(run_level(base_url, model, 2, 2, args.max_tokens, first=10_000, request=request))  # warm-up
    rows = []
    for c in LEVELS:
        n = max(args.min_requests, args.requests_per_client * c)
        tokens, wall, err = asyncio.run(run_level(base_url, model, c, n, args.max_tokens, request=request))
        rows.append((name, c, n, tokens, wall, tokens / wall if wall else 0.0, err))
        print(f"  {name:<34} c={c:<3} {tokens:>6} tokens {wall:7.2f}s {tokens / wall:8.1f} tok/s"
              + (f"  ERROR {err}" if err else ""), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="HF model folder (default: the example teacher, else a built ~5M Llama)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each server")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-scoring", action="store_true", help="leave out the prompt-scoring cells")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    from kdforge.serve import launch

    tmp = Path(tempfile.mkdtemp(prefix="kdforge-bench-serve-"))
    if args.model:
        model_dir, what = args.model.resolve(), "given"
    elif (EXAMPLE_TEACHER / "config.json").is_file():
        model_dir, what = EXAMPLE_TEACHER, "example teacher"
    else:
        model_dir, what = build_bench_model(tmp), "built: random-init 'small' Llama, trained BPE tokenizer"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    print(f"model: {model_dir} ({what}; {n_params(model_dir) / 1e6:.2f}M parameters); max_tokens "
          f"{args.max_tokens}; OMP_NUM_THREADS={args.threads}; {os.cpu_count()} CPUs", flush=True)

    rows: list[tuple] = []
    notes: list[str] = []
    with launch(model_dir, env=env, log_path=tmp / "kdforge-serve.log") as server:
        rows += measure("kdforge serve", server.base_url, server.model, args)
        if not args.skip_scoring:
            rows += measure("kdforge serve, scoring (prompt tok/s)", server.base_url, server.model, args,
                            request=scoring)
    if args.skip_transformers:
        notes.append("transformers serve: skipped (--skip-transformers)")
    else:
        for label, extra in (("transformers serve", []),
                             ("transformers serve --continuous-batching", ["--continuous-batching"])):
            ts = TransformersServe(model_dir, env, extra, tmp / f"{label.replace(' ', '_')}.log")
            try:
                if ts.why_not:
                    notes.append(f"{label}: did not run ({ts.why_not})")
                    continue
                rows += measure(label, ts.base_url, ts.model_id, args)
            finally:
                ts.stop()

    print()
    print("| server | concurrency | requests | tokens (completion; prompt for scoring) | wall s | tokens/s | x vs c=1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = {}
    for name, c, n, tokens, wall, rate, err in rows:
        base.setdefault(name, rate)
        x = rate / base[name] if base[name] else 0.0
        print(f"| {name} | {c} | {n} | {tokens} | {wall:.2f} | {rate:.1f} | {x:.2f} |"
              + (f" error: {err}" if err else ""))
    for note in notes:
        print(f"\n{note}")
    ours = {row[1]: row[5] for row in rows if row[0] == "kdforge serve"}
    print()
    if ours.get(1):
        print(f"kdforge serve: c=16 is {ours[16] / ours[1]:.2f}x its c=1 rate (goal >= 3x)")
    for name, c, _n, _t, _w, rate, err in rows:
        if not name.startswith("kdforge serve") and c == 16 and rate and not err:
            print(f"kdforge serve vs {name} at c=16: {ours[16] / rate:.2f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
