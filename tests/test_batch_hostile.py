"""generate --batch against a hostile Batch provider (issue 22): a result file that never ends, a
poll or download that hangs; the client is a real `kdforge` process, stopped with real signals.
Promises: memory stays bounded, a signal stops the run at once (state saved, exit 130), a re-run
finishes with every sample once and nothing held."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
from conftest import cli_env
from fault_server import FaultConfig, FaultServer
from generate_cli import KEY, gen_args, gen_in_process, lines, run_gen
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdforge.errors import BudgetExceededError, KdforgeError
from kdforge.teacher.budget import BudgetLedger
from kdforge.teacher.pricing import NANO, Prices

FLAGS = ("--batch", "--batch-size", 3, "--batch-poll", 0.05, "--temperature", 0, "--max-tokens", 16,
         "--price-input", 3, "--price-output", 15)
RSS_LIMIT_MB = 400  # the old client passed this within seconds of a never-ending download


def _popen(tmp: Path, url: str, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kdforge", *map(str, gen_args(tmp, url, *FLAGS, *extra, total=6))]
    return subprocess.Popen(cmd, env=cli_env(OPENAI_API_KEY=KEY), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _watch(proc: subprocess.Popen, until, timeout: float, what: str) -> float:
    """Wait for `until()` (or the end of the process); returns the highest RSS seen (MB). Kills a
    process that passes RSS_LIMIT_MB, so a regression fails the test instead of the machine."""
    peak, end = 0.0, time.monotonic() + timeout
    while proc.poll() is None and not until():
        peak = max(peak, _rss_mb(proc.pid))
        if peak > RSS_LIMIT_MB:
            proc.kill()
            pytest.fail(f"RSS {peak:.0f} MB while {what}: the download is held in memory")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out ({timeout} s) waiting for {what}")
        time.sleep(0.05)
    return peak


def _held_and_spent(tmp: Path) -> tuple[int, int]:
    led = BudgetLedger(tmp / "ckpt" / "budget.jsonl", Prices(3.0, 15.0, "t"), readonly=True)
    return led.reserved_nano, led.spent_nano


def _once_each(tmp: Path, srv: FaultServer, paid_once: bool = True) -> None:
    rows = lines(tmp / "kd.jsonl")
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6 and len({r["prompt"] for r in rows}) == 6
    billed = [h.prompt for h in srv.hits if h.billed]
    assert not paid_once or len(billed) == len(set(billed)), "a sample was paid for twice"


def test_a_never_ending_result_file_is_cut_at_its_cap_in_bounded_memory(tmp_path):
    """Before: the whole body was read into memory (RSS grew with every byte) and the run never ended."""
    with FaultServer(FaultConfig(api_key=KEY, batch_latency=0.05, endless_content=1, endless_rate=40e6)) as srv:
        proc = _popen(tmp_path, srv.url)
        peak = _watch(proc, lambda: False, 90, "the run with a never-ending result file")
        out, err = proc.communicate()
        assert proc.returncode == 0, err
        assert "cap of" in err and "bytes" in err and "--max-tokens 16" in err, err  # the cap is named
        _once_each(tmp_path, srv, paid_once=False)  # the rows it could not read were billed, and retried
        assert srv.count(kind="ok") >= 1  # ... online
        assert srv.endless_sent < 64 << 20  # it hung up near the cap, not at the end of the machine
        billed = srv.billed_usd(3.0, 15.0)
    assert peak < RSS_LIMIT_MB
    held, spent = _held_and_spent(tmp_path)
    assert held == 0 and spent >= billed * 1e9 - 12  # the unread rows are charged: never less than billed


@pytest.mark.parametrize("window,signals", [("poll", [signal.SIGTERM]), ("download", [signal.SIGINT, signal.SIGINT]),
                                            ("endless", [signal.SIGTERM])])
def test_a_signal_while_a_call_hangs_stops_at_once_then_a_rerun_finishes(tmp_path, window, signals):
    """Before: a poll to a hanging server held the process past SIGTERM until its timeout; a
    never-ending download ignored SIGTERM and two SIGINTs."""
    cfg = FaultConfig(api_key=KEY, batch_latency=0.05, hold_poll=60 if window == "poll" else 0,
                      hold_content=60 if window == "download" else 0,
                      endless_content=99 if window == "endless" else 0, endless_rate=50e3)
    with FaultServer(cfg) as srv:
        proc = _popen(tmp_path, srv.url)
        started = {"poll": lambda: srv.polls >= 1, "download": lambda: srv.content_gets >= 1,
                   "endless": lambda: srv.endless_sent > 0}[window]
        _watch(proc, started, 60, f"a hanging {window}")
        assert proc.poll() is None
        time.sleep(0.3)
        t0 = time.monotonic()
        for s in signals:
            proc.send_signal(s)
            time.sleep(0.1)
        peak = _watch(proc, lambda: False, 10, "the run to stop after the signal")
        took = time.monotonic() - t0
        out, err = proc.communicate()
        assert proc.returncode == 130, err
        assert took < 6, f"took {took:.1f} s to stop"
        assert peak < RSS_LIMIT_MB
        assert "interrupted" in err or "interrupted" in out
        srv.cfg.hold_poll = srv.cfg.hold_content = 0
        srv.cfg.endless_content = 0
        p = run_gen(tmp_path, srv.url, *FLAGS, total=6)
        assert p.returncode == 0, p.stderr
        _once_each(tmp_path, srv)
        assert set(srv.batch_rows.values()) == {1}  # resumed the batches: no row submitted twice
    assert _held_and_spent(tmp_path)[0] == 0


def test_a_hanging_poll_runs_into_its_deadline_and_the_run_stops_resumable(tmp_path):
    """Every control-plane call has a deadline: a poll that never answers is a timeout, retried,
    and then the run stops (exit 1) naming the call, with the batch kept for the re-run."""
    with FaultServer(FaultConfig(api_key=KEY, batch_latency=0.05, hold_poll=30)) as srv:
        t0 = time.monotonic()
        r, out, err = gen_in_process(tmp_path, srv.url, total=3, batch=True, batch_size=3, batch_poll=0.05,
                                     timeout=0.5, max_retries=1, retry_base=0.05, retry_max=0.1, temperature=0)
        assert time.monotonic() - t0 < 10
        assert isinstance(r, KdforgeError) and r.exit_code == 1, (r, err)
        assert "poll" in str(r) and "0.5" in str(r), r
        srv.cfg.hold_poll = 0
        r, out, err = gen_in_process(tmp_path, srv.url, total=3, batch=True, batch_size=3, batch_poll=0.05,
                                     temperature=0)
        assert not isinstance(r, Exception), (r, err)
        assert len(srv.batches) == 1 and len(lines(tmp_path / "kd.jsonl")) == 3


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endless=st.integers(0, 3), hang=st.booleans(), row_errors=st.sampled_from([0, 2]),
       fallback=st.sampled_from(["online", "batch"]), limit_rows=st.floats(1.0, 14), batch_size=st.integers(2, 5))
def test_a_lying_batch_provider_never_passes_the_budget_and_the_rerun_recovers(
        tmp_path_factory, endless, hang, row_errors, fallback, limit_rows, batch_size):
    """Never-ending result files, polls that hang, rows that fail: the first run finishes, stops at
    the budget, or stops naming the hanging call; the ledger never passes the limit nor falls below
    the bill; once the provider behaves, the same command finishes with every sample once."""
    tmp = tmp_path_factory.mktemp("liar")
    limit = float(Fraction(limit_rows) * Fraction(200 * 3 + 16 * 15) / 2 / 10**6)
    cfg = FaultConfig(api_key=KEY, batch_latency=0.02, endless_content=endless, endless_rate=20e6,
                      hold_poll=5 if hang else 0, batch_row_errors=row_errors)
    run = dict(total=6, batch=True, batch_size=batch_size, batch_poll=0.02, batch_fallback=fallback, temperature=0,
               price_input=3.0, price_output=15.0, budget_limit=limit, retry_base=0.01, retry_max=0.02,
               max_retries=1, timeout=0.4)
    with FaultServer(cfg) as srv:
        for attempt in (1, 2):
            r, out, err = gen_in_process(tmp, srv.url, **run)
            led = BudgetLedger(tmp / "ckpt" / "budget.jsonl", Prices(3.0, 15.0, "t"), limit, readonly=True)
            assert led.spent_nano + led.reserved_nano <= led.limit_nano
            # never below the bill: a batch still open when the run stopped is covered by its holds
            assert led.spent_nano + led.reserved_nano >= srv.billed_usd(3.0, 15.0) * NANO - 16
            rows = lines(tmp / "kd.jsonl")
            assert len({x["id"] for x in rows}) == len(rows) == len({x["prompt"] for x in rows}) <= 6
            if isinstance(r, Exception) and not isinstance(r, BudgetExceededError):
                assert attempt == 1 and hang and "poll" in str(r) and "deadline" in str(r), (r, err)
            elif not isinstance(r, Exception):
                assert len(rows) == 6 and led.reserved_nano == 0
            srv.cfg.hold_poll, srv.cfg.endless_content = 0, 0
