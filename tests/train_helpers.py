"""Helpers for the training tests: a small config on the session tokenizer and a data file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import cli_env


def train_config(tmp: Path, tokenizer_dir: Path, data: Path, *, out: str = "out", **train) -> Path:
    """Write a toy-model config; `train` overrides keys of the train section."""
    cfg = {
        "model": {"preset": "toy", "max_seq_len": 128},
        "io": {"tokenizer_path": str(tokenizer_dir), "train_shards": [str(data)],
               "output_dir": str(tmp / out)},
        "loss": {"kind": "ce"},
        "train": {"micro_batch_size": 4, "grad_accum": 1, "seq_lengths": [64], "max_steps": 10,
                  "lr": 3e-3, "warmup_steps": 2, "save_steps": 5, "save_total_limit": 3, "seed": 0,
                  **train},
    }
    path = tmp / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def popen_train(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdforge", "train", "--config", str(config), *extra],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(pred, timeout: float = 120, interval: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return False


def kill9(p: subprocess.Popen) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)


def metrics(out: Path) -> dict[int, dict]:
    """step -> training record of metrics.jsonl. A step logged twice (a resume that kept the
    records past its checkpoint) fails here: a dict would silently keep only the last one."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r or "loss_on_policy" in r]  # training steps, not eval records
    steps = [r["step"] for r in rows]
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    assert not repeated, f"{out / 'metrics.jsonl'}: steps logged more than once: {repeated}"
    return {r["step"]: r for r in rows}


def weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(ckpt / "model.safetensors"))
