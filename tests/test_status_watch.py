"""`kdforge status --watch` in a real terminal (tmux): it follows the status file the test writes,
shows the step advancing, and exits 0 on `q` and on Ctrl-C."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdforge.atomic import atomic_write_json

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")


def write_status(base: Path, step: int, **extra) -> None:
    status = {"status": "training", "current_step": step, "total_steps": 100, "batch_number": 2,
              "batch_step": step - 50, "batch_steps": 50, "batch_queue_size": 3, "current_file": "week2.jsonl",
              "loss": 2.0 - step / 100, "learning_rate": 1e-4, "tokens_per_s": 900.0,
              "last_checkpoint": f"checkpoint-{step - step % 5}", "pid": os.getpid(), "last_error": None,
              "eval": {"step": 50, "after": "batch 1", "ce": 1.7, "change_since_first": -0.05},
              "eval_history": [{"step": 25, "ce": 1.8}, {"step": 50, "ce": 1.7}], **extra}
    atomic_write_json(base / "status" / "training_status.json", status)


class Pane:
    """A detached tmux session running one command, on its own server socket."""

    def __init__(self, tmp: Path, command: str):
        self.socket = str(tmp / "tmux.sock")
        self.rc_file = tmp / "rc"
        wrapped = f"{command}; echo $? > {shlex.quote(str(self.rc_file))}; sleep 30"
        self.tmux("new-session", "-d", "-s", "w", "-x", "120", "-y", "40", wrapped)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True,
                              check=True).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "w")

    def wait_for(self, text: str, timeout: float = 60) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never appeared; screen:\n{self.screen()}")

    def exit_code(self, timeout: float = 30) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.rc_file.exists() and self.rc_file.read_text().strip():
                return int(self.rc_file.read_text())
            time.sleep(0.1)
        raise AssertionError(f"the watch did not exit; screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def base(tmp_path):
    b = tmp_path / "base"
    (b / "status").mkdir(parents=True)
    (b / "logs").mkdir()
    day = time.strftime("%Y%m%d")
    (b / "logs" / f"daemon_{day}.log").write_text(
        "".join(f"2026-12-01 10:00:{s:02d} INFO step {s} loss {2 - s / 100:.4f} lr 0.0001 900 tok/s\n"
                for s in range(40, 51)))
    return b


def start_watch(tmp_path: Path, base: Path) -> Pane:
    cmd = f"{shlex.quote(sys.executable)} -m kdforge status --base-dir {shlex.quote(str(base))} --watch --interval 0.2"
    return Pane(tmp_path, f"cd {shlex.quote(os.getcwd())} && {cmd}")


@pytest.mark.parametrize("key", ["q", "C-c"])
def test_watch_follows_the_step_and_quits_cleanly(tmp_path, base, key):
    write_status(base, 51)
    pane = start_watch(tmp_path, base)
    try:
        screen = pane.wait_for("51 / 100")
        for shown in ("training", "week2.jsonl", "queue", "3 file(s)", "checkpoint-50", "held-out ce",
                      "1.7000", "step 50 loss"):
            assert shown in screen, (shown, screen)
        assert any(c in screen for c in "▁▂▃▄▅▆▇█"), screen  # the loss sparkline
        write_status(base, 57)
        screen = pane.wait_for("57 / 100")
        write_status(base, 63, last_error="DataError: week3.jsonl: no usable line")
        screen = pane.wait_for("63 / 100")
        assert "ETA 0:" in screen, screen  # three steps seen advance: a pace, so an ETA
        assert "no usable line" in screen
        pane.tmux("send-keys", "-t", "w", key)
        assert pane.exit_code() == 0
        assert "Traceback" not in pane.screen()
    finally:
        pane.close()


def test_watch_reads_only(tmp_path, base):
    """The daemon's files are the same bytes and mtimes after a watch ran over them."""
    write_status(base, 51)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in base.rglob("*") if p.is_file()}
    pane = start_watch(tmp_path, base)
    try:
        pane.wait_for("51 / 100")
        time.sleep(1)
        pane.tmux("send-keys", "-t", "w", "q")
        assert pane.exit_code() == 0
    finally:
        pane.close()
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in base.rglob("*") if p.is_file()}
    assert after == before


def test_foreground_daemon_on_a_terminal_shows_a_batch_bar(tmp_path, tiny_model_dir):
    """The daemon in a terminal: one bar for the batch in training (step n/total of the batch),
    the log lines above it; the same command without a terminal prints plain lines only."""
    from daemon_helpers import batch, daemon_config, drop

    base = tmp_path / "base"
    cfg = daemon_config(tmp_path / "daemon.yaml", tiny_model_dir, save_steps=4)
    drop(base, "stream.jsonl", batch(200, seed=3))  # 50 steps: long enough to catch the bar mid-way
    cmd = (f"{shlex.quote(sys.executable)} -m kdforge daemon --base-dir {shlex.quote(str(base))} "
           f"--config {shlex.quote(str(cfg))} --once")
    env = "env -u CI OMP_NUM_THREADS=1 "  # CI=true (as CI runs) turns the bar off: that is tested below
    pane = Pane(tmp_path, f"cd {shlex.quote(os.getcwd())} && {env}{cmd}")
    try:
        screen = pane.wait_for("batch #1 stream.jsonl", timeout=120)
        assert "/50" in screen and "loss" in screen, screen
        assert pane.exit_code(timeout=180) == 0
    finally:
        pane.close()

    drop(base, "second.jsonl", batch(40, seed=4))
    plain = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=180,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert plain.returncode == 0, plain.stdout + plain.stderr
    text = plain.stdout + plain.stderr
    assert "Batch 2 done: second.jsonl" in text, text
    assert "batch #2" not in text and "\x1b[" not in text  # no bar, no escape codes


def test_watch_shows_the_last_wait_once_a_wait_ended(tmp_path):
    """The live view shows `last_wait` (a full disk waited out) as `kdforge status` does."""
    from io import StringIO

    from rich.console import Console

    from kdforge.daemon.watch import _Rate, view

    status = {"status": "idle", "pid": os.getpid(), "last_error": None,
              "last_wait": "waited until 2026-12-06T01:50:00: disk full writing café.jsonl"}
    out = StringIO()
    Console(file=out, width=160).print(view(status, [], _Rate(), tmp_path / "status.json"))
    assert "last wait" in out.getvalue() and "disk full writing café.jsonl" in out.getvalue()
