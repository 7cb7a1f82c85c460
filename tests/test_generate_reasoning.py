"""A reasoning ("thinking") teacher over real HTTP (issue 23 item 2): its thinking is kept whole
in `teacher_reasoning` and counted; paid answers that cannot be used (thinking filled --max-tokens,
empty, filtered) stop the run after 10 in a row naming the cause and the --max-tokens that fits;
a 400 for a sampling parameter the provider fixes names the flag."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
from conftest import run_cli
from fault_server import THINKING, Act, FaultConfig, FaultServer
from generate_cli import KEY, gen_in_process, lines, run_gen
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdforge.errors import BudgetExceededError, KdforgeError
from kdforge.teacher.budget import BudgetLedger
from kdforge.teacher.pricing import NANO, Prices

PRICES = dict(price_input=3.0, price_output=15.0)


def _thinking(n: int) -> str:
    return "".join(THINKING[i % len(THINKING)] for i in range(n))


@pytest.mark.parametrize("field,batch", [("reasoning_content", False), ("reasoning", False),
                                         ("reasoning_content", True)])
def test_the_thinking_is_kept_whole_counted_and_shown(tmp_path, field, batch):
    """Before: the reasoning was dropped from every record (88% of the tokens paid for)."""
    with FaultServer(FaultConfig(api_key=KEY, reasoning_tokens=30, reasoning_field=field, batch_latency=0.05)) as srv:
        extra = dict(batch=True, batch_size=2, batch_poll=0.05) if batch else {}
        r, out, err = gen_in_process(tmp_path, srv.url, total=4, max_tokens=64, **PRICES, **extra)
        assert not isinstance(r, Exception), (r, err)
    rows = lines(tmp_path / "kd.jsonl")
    assert len(rows) == 4
    for row in rows:
        assert row["teacher_reasoning"] == _thinking(30)  # whole, non-ASCII intact
        assert row["teacher_text"] and "考える" not in row["teacher_text"]
        tok = row["metadata"]["tokens"]
        assert tok["reasoning"] == 30 and tok["completion"] > 30 and tok["total"] == tok["prompt"] + tok["completion"]
    p = run_cli("data", "inspect", tmp_path / "kd.jsonl", "-n", 1)
    assert p.returncode == 0, p.stderr
    assert "Reasoning" in p.stdout and "考える" in p.stdout and "(30 of them reasoning)" in p.stdout
    p = run_cli("data", "validate", tmp_path / "kd.jsonl")
    assert p.returncode == 0, p.stderr
    assert "with reasoning 4" in p.stdout


def test_a_cached_thinking_answer_keeps_its_thinking(tmp_path):
    with FaultServer(FaultConfig(api_key=KEY, reasoning_tokens=8)) as srv:
        gen_in_process(tmp_path / "a", srv.url, total=3, max_tokens=64, cache_dir=str(tmp_path / "cache"))
        r, _, err = gen_in_process(tmp_path / "b", srv.url, total=3, max_tokens=64, cache_dir=str(tmp_path / "cache"))
        assert not isinstance(r, Exception) and r.cached == 3, err
    assert [x["teacher_reasoning"] for x in lines(tmp_path / "b" / "kd.jsonl")] == [_thinking(8)] * 3
    assert all(x["metadata"]["tokens"]["reasoning"] == 8 for x in lines(tmp_path / "b" / "kd.jsonl"))


def test_thinking_that_fills_max_tokens_stops_after_10_paid_answers_naming_the_fix(tmp_path):
    """Before: 300 empty answers were paid for out of 300 prompts, then 'answered none ... (last:
    the teacher's answer is empty)' without naming --max-tokens."""
    with FaultServer(FaultConfig(api_key=KEY, reasoning_tokens=300)) as srv:
        r, out, err = gen_in_process(tmp_path, srv.url, total=40, max_tokens=64, concurrency=1, **PRICES)
        assert isinstance(r, KdforgeError) and r.exit_code == 1, (r, err)
        assert srv.count(status=200) == 10  # ten paid, then it stopped
        msg = str(r)
        assert "10 answers in a row" in msg and "cut by --max-tokens" in msg, msg
        assert "thinking used 64 tokens of --max-tokens 64" in msg and "--max-tokens 256" in msg, msg
        billed = srv.billed_usd(3.0, 15.0)
        led = BudgetLedger(tmp_path / "ckpt" / "budget.jsonl", Prices(3.0, 15.0, "t"), readonly=True)
        assert abs(led.spent_nano - billed * NANO) <= 10  # the unusable answers are paid for, and counted
        assert not lines(tmp_path / "kd.jsonl")
        # the fix works, and the prompts of the streak are sent again
        r, out, err = gen_in_process(tmp_path, srv.url, total=12, max_tokens=400, concurrency=2, **PRICES)
        assert not isinstance(r, Exception), (r, err)
    rows = lines(tmp_path / "kd.jsonl")
    assert len(rows) == 12 and all(x["teacher_reasoning"] == _thinking(300) for x in rows)


def test_unusable_answers_and_rejections_share_one_streak(tmp_path):
    """Empty answers, answers quoting the key and 400s, interleaved: one streak of 10 stops the run."""
    script = (Act(status=400), Act(echo_key_at=0), Act(status=400), Act(echo_key_at=3))
    with FaultServer(FaultConfig(api_key=KEY, script=script)) as srv:
        r, out, err = gen_in_process(tmp_path, srv.url, total=30, concurrency=1)
        assert isinstance(r, KdforgeError) and r.exit_code == 1, (r, err)
        assert srv.received == 10, srv.received
        assert "quoting the API key" in str(r) and "rejected (400)" in str(r), r
        assert KEY not in str(r) + out + err


def test_a_400_for_a_fixed_temperature_names_the_flag(tmp_path):
    with FaultServer(FaultConfig(api_key=KEY, fixed_temperature=1.0)) as srv:
        p = run_gen(tmp_path, srv.url, "--temperature", 0.6, total=3)
        assert p.returncode == 1, p.stderr
        assert "only 1 is allowed" in p.stderr and "set --temperature 1" in p.stderr, p.stderr
        p = run_gen(tmp_path, srv.url, "--temperature", 1, total=3)
        assert p.returncode == 0, p.stderr


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=30)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(TEXT.filter(lambda t: t.strip()), min_size=3, max_size=12,
                      unique_by=lambda t: " ".join(t.split()).lower()),
       think=st.sampled_from([0, 5, 40, 200]), max_tokens=st.sampled_from([16, 48, 128]),
       usage=st.sampled_from(["honest", "missing", "huge", "string"]), limit_rows=st.floats(0.5, 20),
       batch=st.booleans())
def test_a_lying_thinking_teacher_never_passes_the_budget_and_loses_no_sample(tmp_path_factory, prompts, think,
                                                                              max_tokens, usage, limit_rows, batch):
    """Over generated non-ASCII prompts, a thinking teacher (thinking shorter or longer than
    --max-tokens) with lying usage, online or through the Batch API: spend never passes the limit
    nor falls below the bill; every record is written once with its thinking whole; a run that
    stops names the cause (budget, or the thinking cut by --max-tokens)."""
    tmp = tmp_path_factory.mktemp("think")
    src = tmp / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    limit = float(Fraction(limit_rows) * Fraction(100 * 3 + max_tokens * 15) / 10**6)
    script = (Act(usage=usage), Act())
    cfg = FaultConfig(api_key=KEY, reasoning_tokens=think, script=script, batch_latency=0.02,
                      batch_usage=usage)
    with FaultServer(cfg) as srv:
        extra = dict(batch=True, batch_size=4, batch_poll=0.02) if batch else {}
        r, out, err = gen_in_process(tmp, srv.url, total=len(prompts), prompts=[str(src)], max_tokens=max_tokens,
                                     budget_limit=limit, retry_base=0.01, concurrency=3, **PRICES, **extra)
        billed = srv.billed_usd(3.0, 15.0)
        paid = [h.prompt for h in srv.hits if h.billed]
    led = BudgetLedger(tmp / "ckpt" / "budget.jsonl", Prices(3.0, 15.0, "t"), limit, readonly=True)
    assert led.spent_nano <= led.limit_nano and led.reserved_nano == 0
    assert led.spent_nano >= billed * NANO - 2 * len(paid)
    rows = lines(tmp / "kd.jsonl")
    assert len({x["id"] for x in rows}) == len(rows) == len({x["prompt"] for x in rows})
    assert len(paid) == len(set(paid))  # no prompt paid for twice
    for x in rows:
        assert x["prompt"].strip() in {p.strip() for p in prompts}
        assert x.get("teacher_reasoning", "") == _thinking(min(think, max_tokens))
    if r is None or not isinstance(r, Exception):
        assert len(rows) == len(prompts)
    elif isinstance(r, BudgetExceededError):
        assert "budget" in str(r)
    else:
        assert isinstance(r, KdforgeError) and think >= max_tokens, (r, err)
        assert "--max-tokens" in str(r) and "thinking" in str(r), r
