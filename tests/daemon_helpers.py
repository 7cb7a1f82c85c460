"""Helpers for the daemon tests: a tiny-model daemon config, a real `kdforge daemon` process, and
readers for what it leaves in its base dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import cli_env, synthetic_records, write_jsonl
from train_helpers import wait_for

# LoRA (r=16, every linear layer and the LM head) at a high lr: the tiny random model learns in a
# few steps, so "the loss carried over" is visible. 48 records / micro-batch 4 = 12 steps a batch.
LORA = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                 "up_proj", "down_proj", "lm_head"]}
STEPS_PER_BATCH = 12
RECORDS_PER_BATCH = 48


@pytest.fixture(autouse=True)
def one_thread():
    """For modules that run the daemon in this process too: one thread, as the daemon processes
    run (OMP_NUM_THREADS=1), so results compare exactly. Import it to use it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def daemon_config(path: Path, base_model: Path, *, lora: bool = True, loss: dict | None = None,
                  io: dict | None = None, **daemon) -> Path:
    cfg = {
        "daemon": {"base_model": str(base_model), "save_steps": 5, "save_total_limit": 3,
                   "poll_interval": 0.2, "settle_seconds": 0.5, "snapshot_time": "23:59", **daemon},
        "model": {"lora": LORA} if lora else {},
        "loss": loss or {"kind": "ce"},
        "train": {"micro_batch_size": 4, "grad_accum": 1, "seq_lengths": [64], "lr": 3e-3, "seed": 0},
    }
    if io:
        cfg["io"] = io
    path.write_text(yaml.safe_dump(cfg))
    return path


def batch(n: int = RECORDS_PER_BATCH, seed: int = 1) -> list[dict]:
    return synthetic_records(n, seed=seed)


def drop(base: Path, name: str, rows: list[dict] | None = None, lines: list[str] | None = None) -> Path:
    """Write a batch beside the inbox, then move it in (the way users are told to)."""
    tmp = base / f".{name}.writing"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if rows is not None:
        write_jsonl(tmp, rows)
    else:
        tmp.write_text("".join(line + "\n" for line in lines))
    dest = base / "inbox" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return dest


def start_daemon(base: Path, config: Path, log_name: str = "daemon.out") -> subprocess.Popen:
    out = open(base.parent / f"{base.name}.{log_name}", "w")
    return subprocess.Popen([sys.executable, "-m", "kdforge", "daemon", "--base-dir", str(base),
                             "--config", str(config)], env=cli_env(), stdout=out, stderr=subprocess.STDOUT)


def output(base: Path, log_name: str = "daemon.out") -> str:
    p = base.parent / f"{base.name}.{log_name}"
    return p.read_text() if p.exists() else ""


def status(base: Path) -> dict:
    try:
        return json.loads((base / "status" / "training_status.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_until(pred, proc: subprocess.Popen | None, base: Path, what: str, timeout: float = 120) -> None:
    """Wait for `pred()`; fail with the daemon's output if it exits or time runs out."""
    def check():
        if proc is not None and proc.poll() is not None and not pred():
            raise AssertionError(f"daemon exited ({proc.returncode}) while waiting for {what}:\n{output(base)}")
        return pred()
    assert wait_for(check, timeout, 0.05), f"timed out waiting for {what}:\n{output(base)[-3000:]}"


def wait_idle_at(base: Path, step: int, proc: subprocess.Popen, name: str) -> None:
    """Wait until batch `name` is trained: its file gone, status idle at `step`."""
    def done():
        s = status(base)
        return (s.get("status") == "idle" and s.get("current_step") == step
                and not (base / "inbox" / name).exists() and not claimed_files(base, name))
    wait_until(done, proc, base, f"{name} trained to step {step}")


def claimed_files(base: Path, name: str) -> list[Path]:
    """`name`'s claims in inbox/.claimed/ (each is `CLAIMID--name`)."""
    from kdforge.daemon.inbox import claim_parts

    folder = base / "inbox" / ".claimed"
    return sorted(p for p in folder.glob("*") if claim_parts(p)[1] == name) if folder.is_dir() else []


def stop(proc: subprocess.Popen, base: Path, timeout: float = 60) -> int:
    (base / ".stop").touch()
    return proc.wait(timeout=timeout)


def daemon_log(base: Path) -> str:
    return "".join(p.read_text() for p in sorted((base / "logs").glob("daemon_*.log")))


def newest_state(base: Path) -> dict:
    from kdforge.train import checkpoint as ckpt

    last = ckpt.latest_checkpoint(base / "current_model")
    assert last is not None, f"no checkpoint in {base / 'current_model'}"
    return json.loads((last / "trainer_state.json").read_text())


def losses(state: dict) -> dict[int, float]:
    """step -> loss. Fails if a step was logged twice: a dict would silently keep the last one,
    and "no step trained twice" could never fail."""
    pairs = [(h["step"], h.get("loss", h.get("loss_on_policy"))) for h in state["log_history"]
             if "loss" in h or "loss_on_policy" in h]  # on-policy steps log loss_on_policy
    steps = [s for s, _ in pairs]
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    assert not repeated, f"steps logged more than once (trained twice?): {repeated}"
    return dict(pairs)


def batch_state(state: dict) -> dict:
    """The daemon's per-batch record in a trainer_state.json dict."""
    return state["extra"]["daemon"]


class FakeClock:
    """The daemon's `now()`: a time the test sets."""

    def __init__(self, when):
        self.when = when

    def __call__(self):
        return self.when


def run_in_process(base: Path, config: Path, now=None):
    """One `kdforge daemon --once` pass in this process (for clock-driven and reference runs);
    returns the daemon's final TrainState."""
    from datetime import datetime

    from kdforge.config import load_config
    from kdforge.daemon.service import Daemon

    d = Daemon(base, load_config([config]), now=now or datetime.now, handle_signals=False)
    assert d.run(once=True) == 0
    return d.state


# Prompt-only lines (a prompt, no answer): what a daemon with on_policy trains on. Accents, CJK, emoji.
ASKED = ["Wie heißt die Hauptstadt von Österreich?", "日本の首都はどこですか？", "Sort these words: café naïve 🍣",
         "¿Cuánto es 12 más 30?", "What is 7 plus 5? 🙂", "Ελληνικά: τι είναι 3 + 4;"]


def prompt_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` prompt-only rows, alternately {"prompt"} and {"messages"} without the assistant's answer."""
    out = []
    for i in range(n):
        text = f"{ASKED[(i + seed) % len(ASKED)]} ({seed}.{i})"
        out.append({"prompt": text} if i % 2 == 0 else
                   {"messages": [{"role": "system", "content": "Réponds brièvement."}, {"role": "user", "content": text}]})
    return out


def teacher_model(out: Path, tokenizer_dir: Path, seed: int = 1) -> Path:
    """A tiny model of the tests' student shape but other weights: a teacher the student differs
    from (a student equal to its teacher has a reverse KL of 0 and nothing to learn)."""
    from kdforge.model import ModelCfg, write_student

    if not (out / "config.json").is_file():
        write_student(ModelCfg(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, vocab_size=None,
                               ffn_dim=128, max_seq_len=256), tokenizer_dir, out, seed=seed)
    return out


def on_policy_config(path: Path, base_model: Path, teacher: Path | None, fraction: float = 0.25, **daemon) -> Path:
    """A daemon config that trains on-policy (dense teacher at `teacher`) on `fraction` of the steps;
    teacher None: no on_policy section at all (and CE)."""
    daemon_config(path, base_model, loss={"kind": "rkl", "kd_weight": 1.0} if teacher else None, **daemon)
    if teacher is not None:
        raw = yaml.safe_load(path.read_text())
        raw["teacher"] = {"path": str(teacher)}
        raw["on_policy"] = {"fraction": fraction, "max_new_tokens": 6}
        path.write_text(yaml.safe_dump(raw))
    return path


def kill_mid_batch(base: Path, config: Path, name: str, rows: list[dict], at_step: int) -> int:
    """Start a daemon process, drop `rows` as `name`, SIGKILL it once the status shows `at_step`;
    the global step of the newest checkpoint it left."""
    from kdforge.train import checkpoint as ckpt
    from train_helpers import kill9

    proc = start_daemon(base, config, "first.out")
    drop(base, name, rows)
    try:
        wait_until(lambda: status(base).get("current_step", 0) >= at_step, proc, base, f"step {at_step}")
    finally:
        kill9(proc)
    return ckpt.read_state(ckpt.latest_checkpoint(base / "current_model")).global_step


def assert_same_adapter(base: Path, ref_base: Path) -> None:
    """The newest adapters of two daemons' current models hold the same tensors."""
    import torch
    from safetensors.torch import load_file

    from kdforge.train import checkpoint as ckpt

    a, b = (load_file(str(ckpt.latest_checkpoint(d / "current_model") / "adapter_model.safetensors"))
            for d in (base, ref_base))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
