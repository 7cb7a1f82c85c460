"""`kdforge generate` end to end, as the seed plan runs it: the real command in a subprocess
against a real HTTP teacher on 127.0.0.1 (tests/fault_server.py)."""

from __future__ import annotations

import json
import time
from fractions import Fraction

import pytest
from fault_server import FaultConfig, FaultServer
from generate_cli import KEY, gen_in_process, lines, run_gen
from conftest import cli_env, run_cli

from kdforge.data.records import parse_record


@pytest.fixture
def server():
    servers = []

    def start(**kw) -> FaultServer:
        kw.setdefault("api_key", KEY)
        s = FaultServer(FaultConfig(**kw)).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def test_twenty_samples_well_formed_then_rerun_sends_nothing(tmp_path, server):
    srv = server(latency=0.02)
    p = run_gen(tmp_path, srv.url, "--top-logprobs", "2", "--max-tokens", "24", "--concurrency", "4",
                "--price-input", "1", "--price-output", "2", "--budget-limit", "1.0", "--delay", "0", total=20)
    assert p.returncode == 0, p.stderr
    rows = lines(tmp_path / "kd.jsonl")
    assert len(rows) == 20 and srv.count(status=200) == 20 and srv.received == 20
    assert len({r["id"] for r in rows}) == 20 and len({r["prompt"] for r in rows}) == 20
    for r in rows:
        rec = parse_record(r)  # the project's own reader accepts every line
        assert r["teacher_text"] == rec.response and r["messages"] == [{"role": "user", "content": r["prompt"]}]
        m = r["metadata"]
        assert set(m) >= {"model", "source", "finish_reason", "tokens", "cost_usd", "cached", "created"}
        assert m["source"] in {"code", "math", "reasoning", "writing", "knowledge"}
        assert m["tokens"]["total"] == m["tokens"]["prompt"] + m["tokens"]["completion"] > 0
        assert m["cost_usd"] == pytest.approx((m["tokens"]["prompt"] * 1 + m["tokens"]["completion"] * 2) / 1e6, abs=1e-9)
        assert m["cached"] is False and m["created"].endswith("Z")
        lp = r["teacher_logprobs"]
        assert len(lp) == m["tokens"]["completion"] and "".join(t["token"] for t in lp) == r["teacher_text"]
        assert all(len(t["top"]) == 2 and t["logprob"] <= 0 and set(t["top"][0]) == {"token", "logprob", "bytes"} for t in lp)
    assert "generate done: 20/20 samples" in p.stdout and "cost:" in p.stdout
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["status"] == "done" and state["samples"] == 20

    again = run_gen(tmp_path, srv.url, "--top-logprobs", "2", "--max-tokens", "24", "--concurrency", "4",
                    "--price-input", "1", "--price-output", "2", "--budget-limit", "1.0", total=20)
    assert again.returncode == 0, again.stderr
    assert srv.received == 20  # nothing sent
    assert lines(tmp_path / "kd.jsonl") == rows  # nothing written twice
    assert "(0 new, 0 from cache, 20 already there)" in again.stdout


def test_generated_dataset_loads_in_kd_dataset(tmp_path, server, tokenizer_dir):
    from kdforge.data import KDDataset

    srv = server()
    result, _, _ = gen_in_process(tmp_path, srv.url, total=20, max_tokens=12)
    assert not isinstance(result, Exception), result
    ds = KDDataset(jsonl_path=str(tmp_path / "kd.jsonl"), tokenizer_path=str(tokenizer_dir), max_seq_length=4096)
    assert len(ds) == 20
    for i in range(3):
        s = ds[i]
        assert len(s["input_ids"]) == len(s["labels"]) > 0
        assert (s["labels"] != -100).sum() > 0  # the teacher's answer is a training target


def test_budget_limit_stops_after_two_samples_and_stays_stopped(tmp_path, server):
    # Each request costs ~$0.045 (45 completion tokens at $1000/M) and reserves ~$0.05: the seed's
    # "--total 1000 --budget-limit 0.10 -> stops after ~1-2 samples with BudgetExceededError".
    srv = server(completion_tokens=45)
    args = ["--budget-limit", "0.10", "--price-input", "10", "--price-output", "1000", "--max-tokens", "50",
            "--concurrency", "8"]
    p = run_gen(tmp_path, srv.url, *args, total=1000)
    assert p.returncode == 3, p.stderr
    rows = lines(tmp_path / "kd.jsonl")
    assert 1 <= len(rows) <= 2
    assert srv.received == len(rows)  # no request after the stop, none lost
    billed = sum(Fraction(h.prompt_tokens) * 10 + Fraction(h.completion_tokens) * 1000 for h in srv.hits) / 10**6
    assert billed <= Fraction("0.10")
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["status"] == "budget_exhausted" and state["spent_usd"] <= 0.10
    assert state["spent_usd"] >= float(billed)
    assert "budget exhausted" in p.stderr and "spent $" in p.stderr

    again = run_gen(tmp_path, srv.url, *args, total=1000)  # the spend counts across runs
    assert again.returncode == 3 and srv.received == len(rows)


@pytest.mark.parametrize("case", ["bad_key", "unknown_model"])
def test_teacher_refusal_exits_4_within_seconds(tmp_path, server, case):
    srv = server(models=("teacher-model",))
    t0 = time.monotonic()
    if case == "bad_key":
        p = run_gen(tmp_path, srv.url, key="sk-wrong")
        hint = "OPENAI_API_KEY"
    else:
        p = run_gen(tmp_path, srv.url, model="no-such-model")
        hint = "--model"
    assert p.returncode == 4, p.stderr
    assert time.monotonic() - t0 < 15  # startup included, on a loaded 2-core machine
    assert hint in p.stderr
    assert lines(tmp_path / "kd.jsonl") == []
    assert srv.received == 1  # the probe: nothing else was sent
    assert "sk-wrong" not in p.stderr + p.stdout


def test_usage_errors_exit_2_and_dry_run_sends_nothing(tmp_path, server):
    srv = server()
    p = run_gen(tmp_path, srv.url, "--budget-limit", "1", model="mystery-model")
    assert p.returncode == 2 and "--price-input" in p.stderr  # a budget with no price is never $0

    p = run_cli("generate", "--out", tmp_path / "x.jsonl", "--total", "5", env=cli_env(OPENAI_API_KEY=KEY))
    assert p.returncode == 2 and "--teacher is required" in p.stderr and "--model is required" in p.stderr

    p = run_gen(tmp_path, srv.url, "--dry-run", "--budget-limit", "1", "--price-input", "1", "--price-output", "2",
                "--max-tokens", "100", total=50)
    assert p.returncode == 0, p.stderr
    assert "dry run: nothing sent" in p.stdout and "worst case:" in p.stdout and "expected:" in p.stdout
    worst = float(p.stdout.split("worst case:")[1].split("$")[1].split()[0])
    assert worst >= 50 * 100 * 2 / 1e6  # at least max_tokens at the output price for every request
    assert srv.received == 0 and not (tmp_path / "kd.jsonl").exists()


def test_config_file_sets_generate_and_flags_override(tmp_path, server):
    srv = server()
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(f"generate:\n  teacher: {srv.url}\n  model: teacher-model\n  total: 3\n  max_tokens: 8\n"
                   f"  out: {tmp_path / 'kd.jsonl'}\n  mix: {{math: 1}}\n")
    p = run_cli("generate", "--config", cfg, "--total", "4", env=cli_env(OPENAI_API_KEY=KEY))
    assert p.returncode == 0, p.stderr
    rows = lines(tmp_path / "kd.jsonl")
    assert len(rows) == 4 and {r["metadata"]["source"] for r in rows} == {"math"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate:\n  totl: 3\n")
    p = run_cli("generate", "--config", bad, env=cli_env())
    assert p.returncode == 2 and "generate.totl" in p.stderr
