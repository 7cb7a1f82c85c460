"""On-policy over teacher.url against a teacher that lies, has no price, or must score off-policy
steps too (issues 22 and 23 §3): real `kdforge train` processes against tests/scoring_fault_server.py
(a real HTTP server on 127.0.0.1). Apart from test_on_policy.py so the two run on separate workers."""

from __future__ import annotations

import pytest

from conftest import cli_here, run_cli
from kdforge.train import checkpoint as ckpt
from test_on_policy import FREE, op_config
from train_helpers import metrics


def test_a_lying_teacher_stops_training_with_exit_1_and_a_fixed_one_resumes(tmp_path, tokenizer_dir, data_file):
    """teacher.url answers NaN on the second step's scoring: exit 1 naming the teacher, no
    traceback, step 1 saved, nothing of the lie cached; the same teacher fixed: --resume auto
    scores again (the lie was not cached) and finishes."""
    from scoring_fault_server import ScoringFaultServer

    with ScoringFaultServer(512, tokenizer_dir) as srv:
        cfg = op_config(tmp_path, tokenizer_dir, data_file, out="lied", max_steps=3, save_steps=100,
                        teacher={"url": srv.url, "top_logprobs": 3}, on_policy={"fraction": 1.0}, generate=FREE,
                        micro_batch_size=2)
        srv.faults.extend([(None, None)] * 2 + [("nan", None)])  # step 1's two sequences, then a lie
        r = cli_here("train", "--config", cfg)
        assert r.returncode == 1, r.stdout + r.stderr
        assert srv.url in r.stderr and "cannot be true" in r.stderr and "Traceback" not in r.stderr, r.stderr
        out = tmp_path / "lied"
        assert ckpt.read_state(ckpt.latest_checkpoint(out)).global_step == 1
        calls = srv.calls
        # the resume in a new process: only what is on disk can carry a cached lie
        r = run_cli("train", "--config", cfg, "--resume", "auto")
        assert r.returncode == 0, r.stdout + r.stderr
        assert srv.calls >= calls + 2, "the lied-about sequence was scored again"
        assert sorted(metrics(out)) == [1, 2, 3]
        assert metrics(out)[3]["teacher_usd_total"] == 0.0  # prices 0: a teacher said to be free
        assert "$0 per million scored tokens (--price-input/--price-output)" in r.stdout + r.stderr


def test_an_unknown_price_is_exit_2_unless_the_teacher_is_said_to_be_free(tmp_path, tokenizer_dir, data_file):
    """No generate.budget_limit and a model no price table knows: spend would be logged as $0 for a
    teacher nobody priced; exit 2 naming the fields (prices 0, a free local teacher, train: the
    lying-teacher test above runs so)."""
    from scoring_fault_server import ScoringFaultServer

    with ScoringFaultServer(512, tokenizer_dir) as srv:
        cfg = op_config(tmp_path, tokenizer_dir, data_file, out="unpriced", max_steps=1,
                        teacher={"url": srv.url, "top_logprobs": 3}, on_policy={"fraction": 1.0}, micro_batch_size=2)
        r = cli_here("train", "--config", cfg)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "generate.price_input" in r.stderr and "lying-scorer" in r.stderr and "Traceback" not in r.stderr
        assert srv.calls == 0, "nothing is scored for a teacher without a price"


def test_teacher_url_scores_off_policy_steps_whose_records_carry_no_top_k(tmp_path, tokenizer_dir, data_file):
    """teacher.url, loss rkl, half the steps on-policy, data without teacher_logprobs (issue 23 §3):
    trains (was exit 2 "no teacher_logprobs in any record"); the off-policy steps are scored over
    HTTP like the on-policy ones, through the same ledger (every $ of both kinds in one budget),
    and the budget stops either kind with exit 3, never passed."""
    from scoring_fault_server import ScoringFaultServer

    from kdforge.teacher.budget import BudgetLedger
    from kdforge.teacher.pricing import Prices

    price = {"price_input": 1000.0, "price_output": 1000.0}  # $0.001 a token
    with ScoringFaultServer(512, tokenizer_dir) as srv:
        kw = dict(teacher={"url": srv.url, "top_logprobs": 3}, on_policy={"fraction": 0.5}, micro_batch_size=2,
                  max_steps=6, save_steps=100)
        cfg = op_config(tmp_path, tokenizer_dir, data_file, out="offurl", generate={**price, "budget_limit": 10.0}, **kw)
        r = cli_here("train", "--config", cfg)
        assert r.returncode == 0, r.stdout + r.stderr
        m = metrics(tmp_path / "offurl")
        off = [s for s in m if not m[s]["on_policy"]]
        assert off and len(off) < 6, m
        for s in off:  # scored over HTTP: KD on the teacher's text, priced
            assert m[s]["kd_tokens"] > 0 and m[s]["teacher_tokens"] > 0 and m[s]["teacher_usd"] > 0, m[s]
        ledger = BudgetLedger(tmp_path / "offurl" / "on_policy" / "budget.jsonl", Prices(1000.0, 1000.0, "t"),
                              readonly=True)
        # one ledger for both kinds (a tokenizer probe at start, if any, is paid from it too)
        assert ledger.spent == pytest.approx(m[6]["teacher_usd_total"])
        assert sum(m[s]["teacher_usd"] for s in m) <= ledger.spent + 1e-9

        # a limit inside step 2 (past the probe, if any, and step 1): exit 3 with step 1 saved
        limit = ledger.spent - sum(m[s]["teacher_usd"] for s in m) + m[1]["teacher_usd"] + m[2]["teacher_usd"] * 0.5
        low = op_config(tmp_path, tokenizer_dir, data_file, out="offlow", generate={**price, "budget_limit": limit},
                        **kw)
        r = cli_here("train", "--config", low)
        assert r.returncode == 3 and "budget exhausted" in r.stderr, r.stdout + r.stderr
        spent = BudgetLedger(tmp_path / "offlow" / "on_policy" / "budget.jsonl", Prices(1000.0, 1000.0, "t"),
                             readonly=True).spent
        assert spent <= limit + 1e-12
        assert ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "offlow")).global_step == 1
