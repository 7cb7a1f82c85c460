"""What `kdforge generate --batch` saves: the same N samples online and through the Batch API.

Starts `kdforge serve` on the shipped demo teacher (src/kdforge/demo/assets/teacher, offline)
with `--batch-dir`, writes N demo prompts, and runs the real `kdforge generate` command both ways
(temperature 0, a fictitious price of $2 / $8 per million input / output tokens), R times each.
Prints a table of medians: $ per 1,000 samples (from the run's ledger: exactly what it settled),
wall time, HTTP requests the client sent, client CPU seconds; and checks that both datasets hold
the same ids and texts.

    python benchmarks/batch_cost.py                 # 1,000 samples, 3 repeats
    python benchmarks/batch_cost.py --samples 200 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "src" / "kdforge" / "demo" / "assets" / "teacher"
PRICE_IN, PRICE_OUT = 2.0, 8.0  # fictitious USD per million tokens


def child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run(url: str, model: str, prompts: Path, out: Path, n: int, batch: bool, batch_size: int) -> dict:
    cmd = [sys.executable, "-m", "kdforge", "generate", "--out", str(out), "--teacher", url, "--model", model,
           "--total", str(n), "--prompts", str(prompts), "--max-tokens", "24", "--temperature", "0",
           "--price-input", str(PRICE_IN), "--price-output", str(PRICE_OUT), "--concurrency", "32",
           "--api-key-env", "BENCH_KEY"]
    if batch:
        cmd += ["--batch", "--batch-size", str(batch_size), "--batch-poll", "0.5"]
    cpu0, t0 = child_cpu(), time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    wall, cpu = time.perf_counter() - t0, child_cpu() - cpu0
    if p.returncode != 0:
        sys.exit(f"kdforge generate failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    from kdforge.teacher.budget import BudgetLedger
    from kdforge.teacher.pricing import Prices

    ckpt = out.with_name(out.stem + "_checkpoints")
    spent = BudgetLedger(ckpt / "budget.jsonl", Prices(PRICE_IN, PRICE_OUT, "bench"), readonly=True).spent
    if batch:  # upload, submit, polls, downloads: what the client sent
        requests = int(re.search(r"(\d+) Batch API calls", p.stderr).group(1))
    else:
        requests = int(re.search(r"requests:\s+(\d+) sent", p.stdout).group(1))
    rows = {r["id"]: r["teacher_text"] for r in map(json.loads, out.read_text().splitlines())}
    return {"usd_per_1k": spent * 1000 / n, "wall": wall, "requests": requests, "cpu": cpu, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=500)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from kdforge.demo.task import make_prompts
    from kdforge.serve import launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["BENCH_KEY"] = "sk-bench-batch"
    tmp = Path(tempfile.mkdtemp(prefix="kdforge-batch-bench-"))
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in make_prompts(a.samples, 0)))
    results = {"online": [], "batch": []}
    with launch(TEACHER, api_key_env="BENCH_KEY", extra_args=["--batch-dir", str(tmp / "batches")]) as server:
        for i in range(a.repeats):
            for mode in ("online", "batch"):
                results[mode].append(run(server.base_url, server.model, prompts, tmp / f"{mode}{i}.jsonl",
                                         a.samples, mode == "batch", a.batch_size))
    same = all(r["rows"] == results["online"][0]["rows"] for rs in results.values() for r in rs)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("usd_per_1k", "wall", "requests", "cpu")}
           for m, rs in results.items()}
    print(f"{a.samples} samples of the demo teacher, median of {a.repeats}, at ${PRICE_IN:g} / ${PRICE_OUT:g} per "
          f"million input / output tokens (batch: x0.5), batch files of {a.batch_size}\n")
    print("| mode | $ per 1,000 samples | wall s | HTTP requests | client CPU s |")
    print("|---|---|---|---|---|")
    for m, x in med.items():
        print(f"| {m} | {x['usd_per_1k']:.6f} | {x['wall']:.1f} | {x['requests']:.0f} | {x['cpu']:.1f} |")
    ratio = med["batch"]["usd_per_1k"] / med["online"]["usd_per_1k"]
    print(f"\nbatch / online cost: {ratio:.4f}; same ids and texts in every run: {same}")
    print(f"load average: {os.getloadavg()[0]:.2f} (2 cores shared; wall times move with it)")
    if not same or ratio > 0.5 + 1e-6:
        sys.exit("batch must give the online dataset at <= 0.5x its cost")


if __name__ == "__main__":
    main()
