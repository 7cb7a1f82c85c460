"""generate against a hostile teacher and hostile input, over real HTTP (issue 8's reproductions).

A teacher that lies about usage, bills 5xx answers, echoes the key, rejects everything; an
`--out` that is not ours; flags that are not numbers; a `.txt` prompts file holding JSON.
Each test failed on the code before its fix.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
from fault_server import Act, FaultConfig, FaultServer
from generate_cli import KEY, gen_in_process, lines

from kdforge.errors import DataError, KdforgeError, UsageError

NANO = 10**9


def ledger_nano(ckpt: Path) -> int:
    """Spend as the budget ledger holds it (carry + settles + unsettled reserves), nano-dollars."""
    from kdforge.teacher.budget import BudgetLedger
    from kdforge.teacher.pricing import Prices

    led = BudgetLedger(ckpt / "budget.jsonl", Prices(1, 1, "test"), readonly=True)
    return led.spent_nano


def billed(srv: FaultServer, pin: float, pout: float) -> Fraction:
    """What the teacher really billed, exact USD."""
    return sum((Fraction(h.prompt_tokens) * Fraction(pin) + Fraction(h.completion_tokens) * Fraction(pout)
                for h in srv.hits if h.billed), Fraction(0)) / 10**6


def files_under(*dirs: Path):
    for d in dirs:
        if d.is_file():
            yield d
        elif d.is_dir():
            yield from (p for p in d.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- usage lies

@pytest.mark.parametrize("lie", ["negative", "string", "bool", "float", "huge", "over", "missing"])
def test_lying_usage_is_charged_at_the_worst_case_and_spend_never_goes_down(tmp_path, lie):
    # Before: negative usage read "$-4.0000 spent of $1.00" after two samples; "lots" was a traceback.
    pin, pout, limit = 2.0, 2.0, 1.0
    with FaultServer(FaultConfig(api_key=KEY, script=(Act(usage=lie),))) as srv:
        result, out, err = gen_in_process(tmp_path, srv.url, total=2, price_input=pin, price_output=pout,
                                          budget_limit=limit, concurrency=1)
        assert not isinstance(result, Exception), (result, err)
        assert "warning:" in err and "usage" in err and "worst case" in err
        first = ledger_nano(tmp_path / "ckpt")
        assert Fraction(first, NANO) >= billed(srv, pin, pout) > 0
        assert first <= limit * NANO
        rows = lines(tmp_path / "kd.jsonl")
        assert len(rows) == 2
        for r in rows:  # the record shows what was charged: sane whole numbers
            t = r["metadata"]["tokens"]
            assert all(type(t[k]) is int and t[k] >= 0 for k in ("prompt", "completion", "total"))
            assert t["completion"] <= 16 and r["metadata"]["cost_usd"] > 0

        result, out, err = gen_in_process(tmp_path, srv.url, total=4, price_input=pin, price_output=pout,
                                          budget_limit=limit, concurrency=1)
        assert not isinstance(result, Exception), (result, err)
        second = ledger_nano(tmp_path / "ckpt")
        assert first < second <= limit * NANO  # persisted, and it only went up
        assert Fraction(second, NANO) >= billed(srv, pin, pout)
        assert "$-" not in out + err


# ----------------------------------------------------------------------------- 5xx outcomes

@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_5xx_is_an_unknown_outcome_charged_at_the_worst_case(tmp_path, status):
    # Before: every 5xx settled as never billed; a gateway's 502/504 after the upstream generated and
    # billed the completion left spend below what was billed.
    pin, pout = 1.0, 100.0
    script = (Act(status=status, billed=True, usage="missing"), Act())
    with FaultServer(FaultConfig(api_key=KEY, script=script)) as srv:
        result, out, err = gen_in_process(tmp_path, srv.url, total=3, price_input=pin, price_output=pout,
                                          concurrency=1, retry_base=0.01, max_retries=3)
        assert not isinstance(result, Exception), (result, err)
        assert srv.count(status=status) == 3 and len(lines(tmp_path / "kd.jsonl")) == 3
        assert Fraction(ledger_nano(tmp_path / "ckpt"), NANO) >= billed(srv, pin, pout)


def test_a_5xx_whose_answer_reports_usage_is_settled_at_that_usage(tmp_path):
    # The answer proves what was billed: no need to assume the worst.
    script = (Act(status=500, billed=True, usage="honest"), Act())
    with FaultServer(FaultConfig(api_key=KEY, script=script)) as srv:
        result, _, err = gen_in_process(tmp_path, srv.url, total=2, price_input=1.0, price_output=100.0,
                                        concurrency=1, retry_base=0.01)
        assert not isinstance(result, Exception), (result, err)
        assert Fraction(ledger_nano(tmp_path / "ckpt"), NANO) == pytest.approx(billed(srv, 1.0, 100.0), abs=1e-8)


# ----------------------------------------------------------------------------- the key

@pytest.mark.parametrize("key,at", [("sk-SECRETKEY-0123456789abcdef", 290), ("sk-SECRETKEY-0123456789abcdef", 0),
                                    ("sk-SECRETKEY-0123456789abcdef", 296), ("k3y!", 150)])
def test_a_key_echoed_in_error_text_is_masked_before_it_is_cut(tmp_path, key, at):
    # Before: the text was cut to 300 characters, then masked: a 400 body of 290 characters followed
    # by the key left "sk-SECRETK" in failures.jsonl. Keys under 6 characters were never masked.
    with FaultServer(FaultConfig(api_key=key, script=(Act(status=400, echo_key_at=at),))) as srv:
        result, out, err = gen_in_process(tmp_path, srv.url, key=key, total=1)
        assert isinstance(result, KdforgeError), result
        fails = (tmp_path / "ckpt" / "failures.jsonl").read_text()
        assert fails and "could not be served" in fails
        for f in files_under(tmp_path):
            data = f.read_bytes()
            assert key.encode() not in data, f
            if len(key) >= 8:  # nor a fragment a cut could leave
                assert key[:6].encode() not in data, f
        assert key not in out + err + str(result)


def test_an_answer_quoting_the_key_is_never_stored(tmp_path):
    with FaultServer(FaultConfig(api_key=KEY, script=(Act(echo_key_at=5), Act()))) as srv:
        result, out, err = gen_in_process(tmp_path, srv.url, total=3, concurrency=1)
        assert not isinstance(result, Exception), (result, err)
        assert len(lines(tmp_path / "kd.jsonl")) == 3
        for f in files_under(tmp_path):
            assert KEY.encode() not in f.read_bytes(), f


# ----------------------------------------------------------------------------- a foreign --out

@pytest.mark.parametrize("content", [b"my notes\nthe last line has no newline", b"one line, no newline",
                                     b'{"id": "a", "prompt": "x", "teacher_text": "y"}\nnot ours, torn',
                                     b"\xff\xfe binary\nstuff"])
def test_a_foreign_out_file_is_refused_byte_identical(tmp_path, content):
    # Before: the torn-tail repair cut the last line off, then the file was refused.
    notes = tmp_path / "notes.txt"
    notes.write_bytes(content)
    with FaultServer(FaultConfig(api_key=KEY)) as srv:
        result, _, err = gen_in_process(tmp_path, srv.url, out=str(notes), total=2)
        assert isinstance(result, DataError) and result.exit_code == 2, (result, err)
        assert str(notes) in str(result) and "kdforge" in str(result)
        assert notes.read_bytes() == content
        assert srv.received == 0


def test_our_own_torn_tail_is_still_repaired(tmp_path):
    with FaultServer(FaultConfig(api_key=KEY)) as srv:
        result, _, err = gen_in_process(tmp_path, srv.url, total=2)
        assert not isinstance(result, Exception), err
        with open(tmp_path / "kd.jsonl", "a", encoding="utf-8") as f:
            f.write('{"id": "torn", "prompt": "half a li')
        result, _, err = gen_in_process(tmp_path, srv.url, total=3)
        assert not isinstance(result, Exception), err
        assert "torn last line" in err and len(lines(tmp_path / "kd.jsonl")) == 3


# ----------------------------------------------------------------------------- rejection streaks

def test_an_endpoint_rejecting_everything_stops_with_its_own_message_and_resumes(tmp_path):
    # Before: "the prompts ran out ... add prompts" (exit 2), and a re-run sent nothing.
    with FaultServer(FaultConfig(api_key=KEY, script=(Act(status=400),))) as srv:
        result, _, err = gen_in_process(tmp_path, srv.url, total=30, concurrency=2)
        assert isinstance(result, KdforgeError) and result.exit_code == 1, result
        assert "could not be served" in str(result) and "add prompts" not in str(result)
        assert srv.received <= 12  # a streak of 10 (plus what was in flight), not every prompt
    with FaultServer(FaultConfig(api_key=KEY)) as fixed:  # the endpoint is fixed: the same prompts go again
        result, _, err = gen_in_process(tmp_path, fixed.url, total=30, concurrency=2)
        assert not isinstance(result, Exception), err
        assert len(lines(tmp_path / "kd.jsonl")) == 30


@pytest.mark.parametrize("status", [400, 500])
def test_two_prompts_that_both_fail_name_the_teachers_error_not_the_prompts(tmp_path, status):
    prompts = tmp_path / "two.jsonl"
    prompts.write_text('{"prompt": "first?"}\n{"prompt": "second?"}\n')
    with FaultServer(FaultConfig(api_key=KEY, script=(Act(status=status),))) as srv:
        result, _, err = gen_in_process(tmp_path, srv.url, total=2, prompts=[str(prompts)], retry_base=0.01,
                                        max_retries=1)
        assert isinstance(result, KdforgeError) and result.exit_code == 1, result
        assert "could not be served" in str(result) and "add prompts" not in str(result)
        srv.reset_counts()
        result, _, err = gen_in_process(tmp_path, srv.url, total=2, prompts=[str(prompts)], retry_base=0.01,
                                        max_retries=1)
        assert srv.received >= 2  # a re-run tries them again


# ----------------------------------------------------------------------------- flags and prompt files

@pytest.mark.parametrize("flag,value", [("--price-input", "inf"), ("--price-output", "nan"),
                                        ("--budget-limit", "inf"), ("--budget-limit", "nan"),
                                        ("--budget-limit", "-1"), ("--price-input", "-2")])
def test_non_finite_or_negative_money_flags_exit_2_naming_the_flag(tmp_path, capsys, flag, value):
    # Before: --price-input inf / --budget-limit inf were an OverflowError traceback (exit 1).
    from kdforge.cli import main

    args = {"--price-input": "1", "--price-output": "1", "--budget-limit": "1", flag: value}
    argv = ["generate", "--out", str(tmp_path / "kd.jsonl"), "--teacher", "http://127.0.0.1:9/v1", "--model", "m",
            "--total", "2", "--dry-run", *[x for kv in args.items() for x in kv]]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert flag in err and "Traceback" not in err


def test_a_txt_prompts_file_holding_json_lines_warns_naming_the_line(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('What is a prime?\n{"prompt": "Explain recursion."}\n{"messages": []}\n')
    with FaultServer(FaultConfig(api_key=KEY)) as srv:
        result, _, err = gen_in_process(tmp_path, srv.url, total=3, prompts=[str(prompts)])
        assert not isinstance(result, Exception), err
        assert f"{prompts}:2" in err and "JSON" in err and ".jsonl" in err


# ----------------------------------------------------------------------------- bytes of tokens

def test_token_bytes_of_a_non_ascii_answer_are_kept_for_every_token_and_alternative(tmp_path):
    answer = "日本語 😀 café, ünïcödé"
    with FaultServer(FaultConfig(api_key=KEY, answer=answer)) as srv:
        result, _, err = gen_in_process(tmp_path, srv.url, total=2, top_logprobs=3)
        assert not isinstance(result, Exception), err
    for r in lines(tmp_path / "kd.jsonl"):
        lp = r["teacher_logprobs"]
        assert all(isinstance(t["bytes"], list) for t in lp)
        assert bytes(b for t in lp for b in t["bytes"]) == r["teacher_text"].encode()
        assert any("\ufffd" in t["token"] for t in lp)  # characters split over tokens: the bytes are the truth
        assert all(isinstance(a["bytes"], list) and len(t["top"]) == 3 for t in lp for a in t["top"])
        assert lp[0]["top"][0]["bytes"] == lp[0]["bytes"]
