"""`kdforge train ... | tee log` then Ctrl-C (issue 22): the terminal's SIGINT reaches tee too, so
the pipe breaks before the run saves. A broken stdout never loses the checkpoint or the data: the
run saves, says so on stderr and exits 130; the daemon saves, keeps its batch and exits 0. Real
processes whose stdout is a pipe closed by its reader, then a real SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from conftest import cli_env
from daemon_helpers import batch, claimed_files, daemon_config, drop, status
from kdforge.train import checkpoint as ckpt
from train_helpers import train_config


def start(args: list[str], err_file) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdforge", *map(str, args)], env=cli_env(), text=True,
                            stdout=subprocess.PIPE, stderr=err_file)


def read_until(p: subprocess.Popen, prefix: str) -> list[str]:
    seen = []
    for line in p.stdout:
        seen.append(line)
        if prefix in line:
            return seen
    raise AssertionError(f"exited ({p.wait()}) before printing {prefix!r}: {''.join(seen)}")


def close_reader_then_sigint(p: subprocess.Popen) -> int:
    p.stdout.close()  # tee is gone: the next write to stdout is EPIPE
    os.kill(p.pid, signal.SIGINT)
    return p.wait(timeout=120)


def test_train_into_a_pipe_its_reader_closed_saves_and_exits_130(tmp_path, tokenizer_dir, data_file):
    cfg = train_config(tmp_path, tokenizer_dir, data_file, out="o", max_steps=100_000, save_steps=100_000)
    out, err = tmp_path / "o", tmp_path / "stderr.txt"
    with open(err, "w") as e:
        p = start(["train", "--config", cfg], e)
        read_until(p, "step 2/")
        rc = close_reader_then_sigint(p)
    text = err.read_text()
    assert rc == 130, text  # was 1: click turned the BrokenPipeError into a silent exit
    last = ckpt.latest_checkpoint(out)
    assert last is not None, text  # was none: the pipe broke before the save
    step = ckpt.read_state(last).global_step
    assert step >= 2 and f"stopped by signal at step {step}" in text and last.name in text, text
    assert "Traceback" not in text and "Exception ignored" not in text, text


def test_daemon_into_a_pipe_its_reader_closed_keeps_its_batch(tmp_path, tiny_model_dir):
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0, save_steps=1000)
    base, err = tmp_path / "base", tmp_path / "stderr.txt"
    drop(base, "wöche.jsonl", batch(200, seed=3))  # 50 steps
    with open(err, "w") as e:
        p = start(["daemon", "--base-dir", base, "--config", cfg], e)
        read_until(p, "step 2 loss")
        rc = close_reader_then_sigint(p)
    text = err.read_text()
    assert rc == 0, text
    assert not (base / "rejected" / "wöche.jsonl").exists(), (base / "rejected" / "wöche.jsonl.reason").read_text()
    assert claimed_files(base, "wöche.jsonl"), "the batch stays claimed for the next start"
    last = ckpt.latest_checkpoint(base / "current_model")
    assert last is not None and ckpt.read_state(last).global_step == status(base)["current_step"] >= 2
    assert status(base)["status"] == "stopped" and status(base)["last_checkpoint"] == last.name
    assert "Traceback" not in text, text
