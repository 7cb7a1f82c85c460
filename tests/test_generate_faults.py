"""generate under faults, over real HTTP: SIGKILL and resume, 429/500 storms, dropped and slow
answers, a corrupted cache, rejected prompts, rate-limit tier detection, and the budget
invariant under random concurrency (hypothesis)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from fractions import Fraction

import pytest
from fault_server import FaultConfig, FaultServer
from generate_cli import KEY, gen_args, gen_in_process, lines, run_gen
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import cli_env

from kdforge.data.records import parse_record
from kdforge.errors import BudgetExceededError, KdforgeError


def _assert_unique_and_valid(rows):
    for r in rows:
        parse_record(r)
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["prompt"] for r in rows}) == len(rows)


def test_sigkill_mid_run_then_resume_gives_exactly_total(tmp_path):
    total, conc = 40, 4
    with FaultServer(FaultConfig(api_key=KEY, latency=0.05)) as srv:
        cmd = [sys.executable, "-m", "kdforge", *map(str, gen_args(tmp_path, srv.url, "--concurrency", conc,
                                                                    "--max-tokens", "16", total=total))]
        proc = subprocess.Popen(cmd, env=cli_env(OPENAI_API_KEY=KEY), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        out = tmp_path / "kd.jsonl"
        deadline = time.monotonic() + 60
        while len(lines(out)) < 10 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        written = len(lines(out))
        assert 10 <= written < total, "the run must be killed mid-way"
        with open(out, "a", encoding="utf-8") as f:  # what a kill in the middle of a write leaves
            f.write('{"id": "torn", "prompt": "half a li')

        p = run_gen(tmp_path, srv.url, "--concurrency", conc, "--max-tokens", "16", total=total)
        assert p.returncode == 0, p.stderr
        assert "torn last line" in p.stderr
        rows = lines(out)
        assert len(rows) == total
        _assert_unique_and_valid(rows)
        assert srv.received <= total + conc  # only requests in flight at the kill were sent again


def test_sigint_finishes_in_flight_saves_and_exits_130(tmp_path):
    with FaultServer(FaultConfig(api_key=KEY, latency=0.3)) as srv:
        cmd = [sys.executable, "-m", "kdforge", *map(str, gen_args(tmp_path, srv.url, "--concurrency", 4, total=60))]
        proc = subprocess.Popen(cmd, env=cli_env(OPENAI_API_KEY=KEY), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 60
        while len(lines(tmp_path / "kd.jsonl")) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "interrupted" in err and "re-run the same command to resume" in err
        rows = lines(tmp_path / "kd.jsonl")
        assert srv.count(kind="ok") == len(rows) < 60  # the requests in flight were finished and written
        state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
        assert state["status"] == "interrupted" and state["samples"] == len(rows)


def test_teacher_down_stops_with_state_saved_then_resumes_when_back(tmp_path):
    srv = FaultServer(FaultConfig(api_key=KEY)).start()
    port, url = srv.port, srv.url
    stats, _, err = gen_in_process(tmp_path, url, total=4)
    assert not isinstance(stats, Exception), err
    srv.stop()  # the teacher goes away: connections are refused

    result, out, err = gen_in_process(tmp_path, url, total=10, retry_base=0.01, max_retries=2)
    assert isinstance(result, KdforgeError) and result.exit_code == 1, result
    assert "keeps failing" in str(result) and "re-run the same command" in str(result)
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["status"] == "teacher_unavailable" and state["samples"] == 4
    assert all(not f["permanent"] for f in lines(tmp_path / "ckpt" / "failures.jsonl"))

    with FaultServer(FaultConfig(api_key=KEY), port=port) as back:  # it is back: resume
        stats, _, err = gen_in_process(tmp_path, url, total=10)
        assert not isinstance(stats, Exception), err
        rows = lines(tmp_path / "kd.jsonl")
        assert len(rows) == 10 and back.received == 6
        _assert_unique_and_valid(rows)


def test_429_and_500_storm_completes_without_duplicates(tmp_path):
    with FaultServer(FaultConfig(api_key=KEY, p429=0.3, p500=0.1, retry_after_ms=20, latency=0.01, seed=3)) as srv:
        stats, out, err = gen_in_process(tmp_path, srv.url, total=20, retry_base=0.02, max_retries=12, concurrency=4)
        assert not isinstance(stats, Exception), err
        rows = lines(tmp_path / "kd.jsonl")
        assert len(rows) == 20
        _assert_unique_and_valid(rows)
        kinds = srv.kinds()
        assert kinds["inj429"] >= 3 and kinds["inj500"] >= 1
        assert stats.retries["429"] == kinds["inj429"] and stats.retries["5xx"] == kinds["inj500"]
        assert kinds["ok"] == 20  # each sample answered once: no prompt paid twice
        assert "retried:   429 x" in out


def test_dropped_and_slow_answers_are_retried_and_charged_at_worst_case(tmp_path):
    cfg = FaultConfig(api_key=KEY, p_drop=0.2, p_slow=0.2, slow_seconds=1.5, latency=0.01, seed=5,
                      completion_tokens=10)
    with FaultServer(cfg) as srv:
        stats, out, err = gen_in_process(tmp_path, srv.url, total=12, timeout=0.5, retry_base=0.02, max_retries=12,
                                         price_input=1.0, price_output=100.0)
        assert not isinstance(stats, Exception), err
        rows = lines(tmp_path / "kd.jsonl")
        assert len(rows) == 12
        _assert_unique_and_valid(rows)
        assert stats.retries["dropped"] + stats.retries["timeout"] >= 2
        billed = srv.billed_usd(1.0, 100.0)
        state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
        # Dropped/timed-out attempts were billed by the server; we count their worst case, so never less.
        assert state["spent_usd"] >= billed - 1e-12
        assert sum(r["metadata"]["cost_usd"] for r in rows) == pytest.approx(state["spent_usd"], abs=1e-8)


def test_corrupted_cache_entry_is_detected_and_refetched(tmp_path):
    with FaultServer(FaultConfig(api_key=KEY)) as srv:
        stats, _, err = gen_in_process(tmp_path, srv.url, total=5)
        assert not isinstance(stats, Exception), err
        first = {r["id"]: r["teacher_text"] for r in lines(tmp_path / "kd.jsonl")}
        db = sqlite3.connect(tmp_path / "cache" / "responses.sqlite")
        (key, body), = db.execute("SELECT key, body FROM responses LIMIT 1").fetchall()
        db.execute("UPDATE responses SET body = ? WHERE key = ?", (body.replace(b"teacher", b"TEACHER", 1), key))
        db.commit()
        db.close()
        (tmp_path / "kd.jsonl").unlink()  # regenerate the dataset from the cache

        stats, out, err = gen_in_process(tmp_path, srv.url, total=5)
        assert not isinstance(stats, Exception), err
        assert srv.received == 6  # 5 the first time, then only the corrupted one again
        assert stats.cached == 4 and "1 corrupted cache entries" in out and "corrupted cache entry" in err
        rows = lines(tmp_path / "kd.jsonl")
        assert {r["id"]: r["teacher_text"] for r in rows} == first  # nothing corrupted reached the dataset
        assert sum(r["metadata"]["cached"] for r in rows) == 4
        assert all(r["metadata"]["cost_usd"] == 0 for r in rows if r["metadata"]["cached"])

        (tmp_path / "kd.jsonl").unlink()  # a cache file SQLite cannot read at all: set aside, refetch all
        (tmp_path / "cache" / "responses.sqlite").write_bytes(b"this is not a database" * 100)
        for suffix in ("-wal", "-shm"):
            (tmp_path / "cache" / f"responses.sqlite{suffix}").unlink(missing_ok=True)
        stats, out, err = gen_in_process(tmp_path, srv.url, total=5)
        assert not isinstance(stats, Exception), err
        assert srv.received == 11 and len(lines(tmp_path / "kd.jsonl")) == 5
        assert list((tmp_path / "cache").glob("responses.sqlite.corrupt-*"))


def test_rejected_prompt_is_a_recorded_failure_never_a_sample(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Question number {i}?", "source": "mine"} for i in range(6)]
    rows[2]["prompt"] = "A prompt the teacher rejects <<400>>"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FaultServer(FaultConfig(api_key=KEY)) as srv:
        stats, out, err = gen_in_process(tmp_path, srv.url, total=5, prompts=[str(prompts)])
        assert not isinstance(stats, Exception), err
        data = lines(tmp_path / "kd.jsonl")
        assert len(data) == 5 and all("<<400>>" not in r["prompt"] for r in data)
        fails = lines(tmp_path / "ckpt" / "failures.jsonl")
        assert len(fails) == 1 and "<<400>>" in fails[0]["prompt"] and fails[0]["reason"].startswith("400")
        assert fails[0]["permanent"] is True and stats.failed == {"400": 1}
        assert srv.count(kind="bad") == 1  # not retried
        assert "failed:    1 (400: 1)" in out

        stats, _, _ = gen_in_process(tmp_path, srv.url, total=5, prompts=[str(prompts)])
        assert srv.received == 6  # neither the samples nor the rejected prompt are sent again


def test_rate_limits_detected_from_headers_and_paced_without_429(tmp_path):
    # The server allows 600 requests/min with a burst of 2; an unpaced client with 8 in flight
    # would be refused. No --rpm: the client must learn the limit from x-ratelimit-* headers.
    with FaultServer(FaultConfig(api_key=KEY, rpm=600, burst_seconds=0.2, latency=0.02)) as srv:
        stats, out, err = gen_in_process(tmp_path, srv.url, total=15, concurrency=8)
        assert not isinstance(stats, Exception), err
        assert len(lines(tmp_path / "kd.jsonl")) == 15
        assert srv.count(kind="limit") == 0
        assert "600 requests/min" in err
        starts = sorted(h.t for h in srv.hits)
        assert starts[-1] - starts[0] >= 13 * 0.1  # paced at 10/s


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(latency=st.floats(0.0, 0.03), jitter=st.floats(0.0, 0.02), concurrency=st.integers(1, 8),
       price_in=st.floats(0.1, 50.0), price_out=st.floats(1.0, 2000.0), max_tokens=st.integers(4, 64),
       budget=st.floats(0.0005, 0.05), p_drop=st.sampled_from([0.0, 0.1]), p500=st.sampled_from([0.0, 0.1, 0.3]),
       p500_billed=st.sampled_from([0.0, 0.5, 1.0]), status_5xx=st.sampled_from([500, 502, 504]),
       seed=st.integers(0, 1000))
def test_concurrency_never_crosses_the_budget(tmp_path_factory, latency, jitter, concurrency, price_in, price_out,
                                              max_tokens, budget, p_drop, p500, p500_billed, status_5xx, seed):
    # The teacher bills some of its 5xx (a gateway's 502/504 after the upstream generated): an unknown
    # outcome, so spend must still cover what was billed.
    tmp = tmp_path_factory.mktemp("prop")
    cfg = FaultConfig(api_key=KEY, latency=latency, jitter=jitter, p_drop=p_drop, p500=p500, p500_billed=p500_billed,
                      status_5xx=status_5xx, seed=seed)
    with FaultServer(cfg) as srv:
        result, _, err = gen_in_process(tmp, srv.url, total=25, concurrency=concurrency, max_tokens=max_tokens,
                                        price_input=price_in, price_output=price_out, budget_limit=budget,
                                        retry_base=0.01, max_retries=20)
        assert not isinstance(result, Exception) or isinstance(result, BudgetExceededError), err
        billed = sum(Fraction(h.prompt_tokens) * Fraction(price_in) + Fraction(h.completion_tokens) * Fraction(price_out)
                     for h in srv.hits if h.billed) / 10**6
        assert billed <= Fraction(budget)  # what the teacher would charge
        state = json.loads((tmp / "ckpt" / "state.json").read_text())
        assert state["spent_usd"] <= budget  # what we counted (worst case for unknown outcomes)
        assert state["spent_usd"] >= float(billed) * (1 - 1e-12)  # and never less than was billed
        if isinstance(result, BudgetExceededError):
            assert state["status"] == "budget_exhausted"
