"""Two `kdforge generate` runs on one --out (issue 22): the output file is locked, whatever the
checkpoint directories, so no sample is written (or paid for) twice. Real processes, real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import cli_env
from fault_server import FaultConfig, FaultServer
from generate_cli import KEY, lines, run_gen

TOTAL = 6


def _args(tmp, out, url, ckpt, total=TOTAL):
    return [sys.executable, "-m", "kdforge", "generate", "--out", str(out), "--teacher", url, "--model", "m",
            "--total", str(total), "--checkpoint-dir", str(tmp / ckpt), "--cache-dir", str(tmp / (ckpt + "-cache")),
            "--concurrency", "1", "--max-tokens", "8"]


def _wait_for(cond, proc, what, timeout=60.0):
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the first run ended before {what}"
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_second_run_on_the_same_out_exits_2_naming_the_holder_and_nothing_is_written_twice(tmp_path):
    out = tmp_path / "shared.jsonl"
    with FaultServer(FaultConfig(api_key=KEY, latency=0.4)) as srv:
        first = subprocess.Popen(_args(tmp_path, out, srv.url, "ckpt-a"), env=cli_env(OPENAI_API_KEY=KEY),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(lambda: srv.received >= 1, first, "the first request")
            second = subprocess.run(_args(tmp_path, out, srv.url, "ckpt-b"), env=cli_env(OPENAI_API_KEY=KEY),
                                    capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr
            assert str(out) in second.stderr and f"pid {first.pid}" in second.stderr, second.stderr
            assert "ckpt-a" in second.stderr  # the holder's checkpoint dir: where its state is
            assert "wait for it" in second.stderr or "stop it" in second.stderr  # the fix
            assert not (tmp_path / "ckpt-b" / "budget.jsonl").exists()  # it never reached the teacher
            assert first.wait(timeout=120) == 0, first.stderr.read()
        finally:
            if first.poll() is None:
                first.kill()
        rows = lines(out)
        assert len(rows) == TOTAL and len({r["id"] for r in rows}) == TOTAL
        assert srv.count(status=200) == TOTAL  # paid once per sample
        # the lock goes with its holder: the same second command now runs, and has nothing to do
        again = subprocess.run(_args(tmp_path, out, srv.url, "ckpt-b"), env=cli_env(OPENAI_API_KEY=KEY),
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert srv.count(status=200) == TOTAL and len(lines(out)) == TOTAL


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    out = tmp_path / "kd.jsonl"
    with FaultServer(FaultConfig(api_key=KEY, latency=0.5)) as srv:
        first = subprocess.Popen(_args(tmp_path, out, srv.url, "ckpt"), env=cli_env(OPENAI_API_KEY=KEY),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda: srv.received >= 1, first, "the first request")
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        lock = out.with_name(out.name + ".lock")
        assert lock.exists() and json.loads(lock.read_text())["pid"] == first.pid  # left behind, not held
        srv.cfg.latency = 0
        p = run_gen(tmp_path, srv.url, "--max-tokens", 8, total=TOTAL)
        assert p.returncode == 0, p.stderr
        assert len({r["id"] for r in lines(out)}) == TOTAL == len(lines(out))
