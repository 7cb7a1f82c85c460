"""Daemon latency: from a file landing in the inbox to its first optimizer step, and what one
checkpoint save costs next to the training it protects.

    python benchmarks/daemon_latency.py [--settle 2.0] [--poll 2.0] [--cases toy,small,small-lora]

Each case runs a real `kdforge daemon` process with the daemon's defaults (save_steps 100,
poll_interval 2 s, settle_seconds 2 s unless given) on toy KD records and a student made here:
`toy` (the toy preset, full training), `small` (the small preset, ~4M parameters at this
vocabulary, full training) and `small-lora` (the small preset with LoRA r=16 on every linear layer).
Once the daemon is idle (model loaded), batch 1 (400 records, 100 steps at micro-batch 4) is written
beside the inbox and renamed in; later batch 2 (40 records). Measured:

- arrival -> first step: from the rename to the `updated_at` of the status write the daemon makes
  after its first optimizer step on that file (same host clock). It includes the settle wait (a file
  must be unchanged for settle_seconds before it is taken), tokenising the file and the step itself.
- save share: the one save at step 100 (the log's "Saved checkpoint ... (x s)") divided by the
  time of the 100 training steps before it (the batch's wall time, which also holds tokenising the
  file, minus that save).

The daemon processes run with OMP_NUM_THREADS=1 unless the environment sets it (on a shared
machine, two intra-op threads fighting other jobs make every step several times slower).

Goals (issue 4): first step within 5 s of arrival with the model loaded; the save at most 10% of
the training time at the default save_steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

CASES = {"toy": ("toy", False), "small": ("small", False), "small-lora": ("small", True)}


def prepare(work: Path) -> Path:
    from kdforge.data.tokenizer import train_tokenizer
    from kdforge.data.toy import toy_records

    texts = [t for r in toy_records(600, seed=0) for t in (r["prompt"], r["teacher_text"])]
    train_tokenizer(texts, 512, work / "tokenizer", min_frequency=1)
    return work / "tokenizer"


def make_model(work: Path, preset: str, tokenizer: Path) -> Path:
    from kdforge.model import write_student
    from kdforge.model.student import preset as get_preset

    out = work / f"model-{preset}"
    if not out.exists():
        write_student(get_preset(preset), tokenizer, out, seed=0)
    return out


def write_config(path: Path, model: Path, lora: bool, settle: float, poll: float) -> Path:
    # snapshot_time 23:59: the once-a-day snapshot copy stays out of the measured batch
    cfg = {"daemon": {"base_model": str(model), "settle_seconds": settle, "poll_interval": poll,
                      "snapshot_time": "23:59"},
           "train": {"micro_batch_size": 4, "grad_accum": 1, "seq_lengths": [256], "lr": 1e-3}}
    if lora:
        cfg["model"] = {"lora": {"r": 16, "alpha": 32}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def status(base: Path) -> dict:
    try:
        return json.loads((base / "status" / "training_status.json").read_text())
    except (OSError, ValueError):
        return {}


def wait(pred, timeout: float, what: str, proc: subprocess.Popen) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited ({proc.returncode}) waiting for {what}")
        time.sleep(0.005)
    raise TimeoutError(what)


def arrive(base: Path, name: str, n: int, seed: int, proc: subprocess.Popen, step_before: int) -> float:
    """Drop a batch; return seconds from its rename into the inbox to its first optimizer step."""
    from kdforge.data.toy import toy_records

    tmp = base / f".{name}"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in toy_records(n, seed=seed)))
    os.replace(tmp, base / "inbox" / name)
    t_arrival = time.time()
    wait(lambda: status(base).get("current_step", 0) > step_before, 120, f"first step of {name}", proc)
    seen = status(base)
    if seen["current_step"] != step_before + 1:
        print(f"warning: {name}: first looked at step {seen['current_step']}; the latency includes later steps")
    return datetime.fromisoformat(seen["updated_at"]).timestamp() - t_arrival


def run_case(name: str, work: Path, tokenizer: Path, settle: float, poll: float) -> dict:
    preset, lora = CASES[name]
    model = make_model(work, preset, tokenizer)
    base = work / f"base-{name}"
    shutil.rmtree(base, ignore_errors=True)
    cfg = write_config(work / f"{name}.yaml", model, lora, settle, poll)
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}  # one thread unless told
    out = open(work / f"{name}.out", "w")
    proc = subprocess.Popen([sys.executable, "-m", "kdforge", "daemon", "--base-dir", str(base), "--config", str(cfg)],
                            env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait(lambda: status(base).get("status") == "idle", 300, "model load", proc)
        lat1 = arrive(base, "batch1.jsonl", 400, 1, proc, 0)
        wait(lambda: status(base).get("status") == "idle" and status(base).get("current_step") == 100, 3600,
             "batch 1", proc)
        lat2 = arrive(base, "batch2.jsonl", 40, 2, proc, 100)
        wait(lambda: status(base).get("status") == "idle" and status(base).get("current_step") == 110, 3600,
             "batch 2", proc)
        (base / ".stop").touch()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(p.read_text() for p in sorted((base / "logs").glob("daemon_*.log")))
    params = int(re.search(r"([\d,]+) trainable parameters", log).group(1).replace(",", ""))
    save = float(re.search(r"Saved checkpoint: checkpoint-100 \(([\d.]+)s\)", log).group(1))
    batch_s = float(re.search(r"Batch 1 done: .*?, ([\d.]+)s; file", log).group(1))
    size = sum(f.stat().st_size for f in (base / "current_model" / "checkpoint-110").iterdir())
    train_s = batch_s - save
    return {"case": name, "trainable": params, "first_step_1": lat1, "first_step_2": lat2,
            "train_100": train_s, "save": save, "share": save / train_s, "ckpt_mb": size / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settle", type=float, default=2.0, help="daemon.settle_seconds (default: the daemon's)")
    ap.add_argument("--poll", type=float, default=2.0, help="daemon.poll_interval (default: the daemon's)")
    ap.add_argument("--cases", default="toy,small,small-lora")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kdforge-daemon-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = prepare(work)
    print(f"daemon latency (settle_seconds {args.settle}, poll_interval {args.poll}, save_steps 100, "
          f"micro-batch 4, seq <= 256, OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', '1')}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at start)", flush=True)
    head = (f"{'case':<11} {'trainable':>10} {'arrival->step, batch 1':>23} {'batch 2':>8} "
            f"{'100 steps':>10} {'1 save':>7} {'save/train':>10} {'ckpt size':>10}")
    print(head + "\n" + "-" * len(head), flush=True)
    for case in args.cases.split(","):  # each row as soon as it is measured
        r = run_case(case, work, tokenizer, args.settle, args.poll)
        print(f"{r['case']:<11} {r['trainable']:>10,} {r['first_step_1']:>22.2f}s {r['first_step_2']:>7.2f}s "
              f"{r['train_100']:>9.1f}s {r['save']:>6.2f}s {100 * r['share']:>9.1f}% {r['ckpt_mb']:>8.1f}MB",
              flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end; work dir: {work}")


if __name__ == "__main__":
    main()
