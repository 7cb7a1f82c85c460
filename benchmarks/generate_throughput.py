"""How fast `kdforge generate` drives a rate-limited teacher, and what it costs the client.

Runs the real command (a subprocess) against tests/fault_server.py limiting to R requests/min
(token bucket, 1 s burst, x-ratelimit-* headers; the client is not told R, it learns it), with
realistic latency, and prints a table:

- clean:    achieved requests/min against R, 429s received, client CPU per request, time from
            the command's start to its first request
- faults:   the same with injected 429s (retry-after-ms) and 500s: successful requests/min
            against what the limit leaves, R x (1 - the share of requests answered with a fault)
- budget:   a run stopped by --budget-limit: spent and billed against the limit (overshoot)
- seed:     the seed plan's sequential approach (--delay 20, concurrency 1), for scale

    python benchmarks/generate_throughput.py            # R=600, 300 requests, 300 +- 100 ms
    python benchmarks/generate_throughput.py --quick    # 120 requests, seed row computed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from fault_server import FaultConfig, FaultServer  # noqa: E402

KEY = "sk-bench"


def run(tmp: Path, srv: FaultServer, total: int, *extra: str) -> dict:
    """One `kdforge generate` run; returns its exit code, CPU seconds and start time."""
    prompts = tmp / "prompts.txt"
    if not prompts.exists():
        prompts.write_text("\n".join(f"Benchmark question {i}: explain idea number {i} in two sentences."
                                     for i in range(5000)) + "\n")
    out = tmp / f"run{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "kdforge", "generate", "--out", str(out / "kd.jsonl"), "--teacher", srv.url,
           "--model", "bench-teacher", "--total", str(total), "--prompts", str(prompts), "--max-tokens", "32", *extra]
    env = {**os.environ, "OPENAI_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate()  # reaps the child: its rusage goes to RUSAGE_CHILDREN
    return {"rc": proc.returncode, "t0": t0, "t_end": time.time(), "out": out, "stdout": stdout.decode(),
            "stderr": stderr.decode()}


def child_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def measure(tmp: Path, cfg: FaultConfig, total: int, *extra: str) -> dict:
    with FaultServer(cfg) as srv:
        cpu0 = child_cpu()
        r = run(tmp, srv, total, *extra)
        cpu = child_cpu() - cpu0
        hits = list(srv.hits)
    if r["rc"] not in (0, 3):
        raise SystemExit(f"generate failed ({r['rc']}):\n{r['stderr'][-2000:]}")
    ts = sorted(h.t for h in hits)
    span = ts[-1] - ts[0]
    ok = sum(1 for h in hits if h.kind == "ok")
    return {"sent": len(hits), "ok": ok, "limit429": sum(h.kind == "limit" for h in hits),
            "inj429": sum(h.kind == "inj429" for h in hits), "inj500": sum(h.kind == "inj500" for h in hits),
            "rpm": (len(hits) - 1) / span * 60 if span else 0.0, "ok_rpm": (ok - 1) / span * 60 if span else 0.0,
            "cpu": cpu, "cpu_per_req": cpu / max(1, len(hits)), "first": ts[0] - r["t0"], "wall": r["t_end"] - r["t0"],
            "hits": hits, "run": r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rpm", type=int, default=600)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--latency", type=float, default=0.3)
    ap.add_argument("--jitter", type=float, default=0.1)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--p429", type=float, default=0.2)
    ap.add_argument("--p500", type=float, default=0.05)
    ap.add_argument("--retry-after-ms", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="120 requests; the seed row is computed, not run")
    a = ap.parse_args()
    n = 120 if a.quick else a.requests
    R = a.rpm
    conc = ["--concurrency", str(a.concurrency)]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = dict(api_key=KEY, rpm=R, latency=a.latency, jitter=a.jitter, seed=1)

        # Startup CPU (imports, setup) measured once, so the per-request figure can exclude it.
        startup = measure(tmp, FaultConfig(api_key=KEY), 1)

        clean = measure(tmp, FaultConfig(**base), n, *conc)
        rows.append(("clean server", clean, R))

        faults = measure(tmp, FaultConfig(**base, p429=a.p429, p500=a.p500, retry_after_ms=a.retry_after_ms), n, *conc)
        # What the limit leaves: R minus the share of requests the teacher answered with a fault
        # (the draw of this run, not the nominal share).
        rows.append((f"{a.p429:.0%} 429 + {a.p500:.0%} 500 injected", faults, R * faults["ok"] / faults["sent"]))

        # Budget: each request reserves ~$0.0011 and costs ~$0.0008; a $0.05 limit stops it mid-flight.
        budget = 0.05
        b = measure(tmp, FaultConfig(**base, completion_tokens=24), 400, *conc, "--budget-limit", str(budget),
                    "--price-input", "1", "--price-output", "32")
        billed = sum(Fraction(h.prompt_tokens) * 1 + Fraction(h.completion_tokens) * 32 for h in b["hits"] if h.billed)
        billed /= 10**6
        state = json.loads((b["run"]["out"] / "kd_checkpoints" / "state.json").read_text())

        if a.quick:
            seq = None
        else:
            seq = measure(tmp, FaultConfig(**base), 3, "--delay", "20", "--concurrency", "1")

    print(f"\nkdforge generate against a teacher limiting to R = {R} requests/min "
          f"(latency {a.latency * 1000:.0f} +- {a.jitter * 1000:.0f} ms, {n} samples, concurrency {a.concurrency}, "
          f"limit learned from x-ratelimit-* headers)\n")
    print("| scenario | requests sent | 429 (rate limit) | 429 / 500 injected | req/min sent | ok req/min | "
          "ok req/min / what the limit leaves | client CPU ms/request | first request after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m, allowed in rows:
        print(f"| {name} | {m['sent']} | {m['limit429']} | {m['inj429']} / {m['inj500']} | {m['rpm']:.0f} | "
              f"{m['ok_rpm']:.0f} | {m['ok_rpm'] / allowed:.1%} of {allowed:.0f} | "
              f"{(m['cpu'] - startup['cpu']) / max(1, m['sent']) * 1000:.2f} "
              f"({m['cpu_per_req'] * 1000:.1f} with startup) | {m['first']:.2f} s |")
    if seq is not None:
        print(f"| seed plan: --delay 20, concurrency 1 | {seq['sent']} | {seq['limit429']} | 0 / 0 | "
              f"{seq['rpm']:.1f} | {seq['ok_rpm']:.1f} | {seq['ok_rpm'] / R:.1%} of {R} | - | {seq['first']:.2f} s |")
    else:
        print(f"| seed plan: --delay 20, concurrency 1 | (computed) | 0 | 0 / 0 | 3.0 | 3.0 | {3 / R:.1%} of {R} | - | - |")
    over = max(Fraction(0), billed - Fraction(budget))
    print(f"\nbudget: limit ${budget:.4f}, stopped with exit {b['run']['rc']} after {b['ok']} samples; "
          f"counted ${state['spent_usd']:.6f}, teacher billed ${float(billed):.6f}; overshoot ${float(over):.6f}")
    print(f"startup: {startup['cpu']:.2f} s CPU for a 1-request run; first request {startup['first']:.2f} s after start")
    print(f"at {R} req/min, 10,000 samples take {10000 / (clean['ok_rpm'] or 1):.0f} min "
          f"(the seed plan: {10000 / 3 / 60:.0f} h)")


if __name__ == "__main__":
    main()
