"""Shared fixtures: a real tokenizer trained here, tiny real models, free ports, CLI runner."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]

# Property tests draw the same examples on every run: CI results are reproducible.
settings.register_profile("kdforge", derandomize=True)
settings.load_profile("kdforge")


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """Deterministic prompt/teacher_text records (arithmetic and word tasks) in generate's format."""
    rng = random.Random(seed)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    out = []
    for i in range(n):
        if i % 2 == 0:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            prompt, answer = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        else:
            ws = rng.sample(words, 3)
            prompt, answer = f"Sort these words: {' '.join(ws)}", " ".join(sorted(ws))
        out.append({"id": f"s{i}", "prompt": prompt, "teacher_text": answer,
                    "metadata": {"source": "math" if i % 2 == 0 else "reasoning"}})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


# The files that take longest (each runs whole on one xdist worker, --dist loadfile), longest first:
# started first, so no long file starts last while the other worker has nothing left (xdist's own
# order, by test count, put the one-test files such as test_demo.py last). Seconds on one CPU.
LONGEST_FILES = (
    "test_demo.py",  # 65, two forked trainers on top
    "test_preflight.py",  # 67
    "test_on_policy.py",  # 53
    "test_store.py",  # 33
    "test_train_resume.py",  # 32
    "test_batch.py",  # 32
    "test_report_to.py",  # 29
    "test_daemon_disk_full.py",  # 28
    "test_distributed.py",  # 26
    "test_bench_distill.py",  # 23
    "test_arch_matrix.py",  # 21
    "test_preflight_context.py",  # 20
    "test_daemon_crash.py",  # 20
    "test_batch_hostile.py",  # 19
    "test_daemon_hostile.py",  # 18
    "test_report_to_daemon.py",  # 18
    "test_preflight_model_path.py",  # 18
    "test_generate_faults.py",  # 17
    "test_daemon_waits.py",  # 17
    "test_batch_serve_storage.py",  # 16
    "test_status_watch.py",  # 15
)


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the addopts): one worker more than this process may use CPUs, --maxprocesses capping
    it. Much of the suite waits (servers and daemons polling, processes starting, SIGKILL windows):
    on 2 CPUs the suite used 977 CPU s in 671 s with 2 workers and ran in 573 s with 3.
    PYTEST_XDIST_AUTO_NUM_WORKERS, when set, decides as xdist's own hook reads it."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # the next implementation, xdist's, reads it
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cpus + 1


def pytest_collection_modifyitems(config, items):
    """LONGEST_FILES first, in that order; the other files after them, as collected."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A real byte-level BPE tokenizer (vocab 512) trained on the synthetic records."""
    from kdforge.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    texts = []
    for r in synthetic_records(400):
        texts += [r["prompt"], r["teacher_text"]]
    train_tokenizer(texts, 512, out, min_frequency=1)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random-init Llama student with the tokenizer saved beside it (an HF folder)."""
    from kdforge.model import ModelCfg, write_student

    out = tmp_path_factory.mktemp("tiny_model")
    cfg = ModelCfg(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, vocab_size=None,
                   ffn_dim=128, max_seq_len=256)
    write_student(cfg, tokenizer_dir, out, seed=0)
    return out


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", synthetic_records(64))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(*args, cwd=None, env=None, timeout=300, check=False) -> subprocess.CompletedProcess:
    """Run the real `kdforge` entry point in a subprocess; returns the CompletedProcess."""
    p = subprocess.run([sys.executable, "-m", "kdforge", *map(str, args)], cwd=cwd,
                       env=env or cli_env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"kdforge {' '.join(map(str, args))} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def cli_here(*args, cwd=None, env: dict | None = None, check=False) -> subprocess.CompletedProcess:
    """`kdforge ARGS` through the real entry point (kdforge.cli.main) in this process: what run_cli
    returns, without a Python and torch start-up (3-7 s a run). For a run whose subject is not the
    process: no signal, no second process racing it, no resume that must start cold (a resume
    proves what a checkpoint restores only in a new process: run those with run_cli). As run_cli's
    processes run: one torch thread (OMP_NUM_THREADS=1), `env` over os.environ, in `cwd`; signal
    handlers, threads, os.environ and the cwd are put back after. Its capture is sys.stdout and
    sys.stderr: a test that stdout holds nothing else (a library writing to fd 1, a logger bound to
    the process's stderr) needs run_cli."""
    import contextlib
    import io
    import signal

    import torch

    from kdforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, home, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(home)
        torch.set_num_threads(threads)
        for s, h in handlers.items():
            signal.signal(s, h)
    p = subprocess.CompletedProcess(["kdforge", *map(str, args)], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"kdforge {' '.join(map(str, args))} -> {code}\n{p.stdout}\n{p.stderr}")
    return p
