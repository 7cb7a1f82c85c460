"""The generated layer for generate's money and secrets: a teacher drawn by hypothesis from every
way an OpenAI-compatible server can lie or fail (`fault_server.acts`), over real HTTP, in process.

After each drawn teacher, over a run and its resume:
- spend never decreases (no settle below zero, the resumed ledger holds at least as much),
- spend never passes the limit,
- spend is what the teacher billed (its honest count) or more,
- the API key is in no file under the output, checkpoint and cache directories,
- every stop is one of ours (an exit code of the SPEC), never a traceback.
"""

from __future__ import annotations

import json
from fractions import Fraction

from fault_server import FaultConfig, FaultServer, acts
from generate_cli import gen_in_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdforge.errors import KdforgeError
from kdforge.teacher.budget import BudgetLedger
from kdforge.teacher.pricing import NANO, Prices

KEYS = ("sk-proj-AbCdEf0123456789xyzXYZ", "sk-SECRETKEY-0123456789abcdef", "k3y!")


def _spent_nano(ckpt) -> int:
    return BudgetLedger(ckpt / "budget.jsonl", Prices(1, 1, "read"), readonly=True).spent_nano


def _billed(srv: FaultServer, pin: float, pout: float) -> Fraction:
    return sum((Fraction(h.prompt_tokens) * Fraction(pin) + Fraction(h.completion_tokens) * Fraction(pout)
                for h in srv.hits if h.billed), Fraction(0)) / 10**6


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(script=st.lists(acts(), min_size=1, max_size=6), key=st.sampled_from(KEYS),
       concurrency=st.integers(1, 3), pin=st.floats(0.1, 20.0), pout=st.floats(1.0, 500.0),
       budget=st.floats(0.0002, 0.02))
def test_a_lying_teacher_never_lowers_spend_overspends_or_leaks_the_key(tmp_path_factory, script, key,
                                                                        concurrency, pin, pout, budget):
    tmp = tmp_path_factory.mktemp("liar")
    ckpt = tmp / "ckpt"
    limit_nano = int(Fraction(budget) * NANO)
    with FaultServer(FaultConfig(api_key=key, script=tuple(script))) as srv:
        run = dict(key=key, total=5, concurrency=concurrency, max_tokens=12, price_input=pin, price_output=pout,
                   budget_limit=budget, timeout=0.5, retry_base=0.01, retry_max=0.05, max_retries=2)
        seen = []
        for _ in range(2):  # a run, then its resume
            result, out, err = gen_in_process(tmp, srv.url, **run)
            assert not isinstance(result, Exception) or isinstance(result, KdforgeError), repr(result)
            settles = [json.loads(x) for x in (ckpt / "budget.jsonl").read_text().splitlines() if x.strip()]
            assert all(r["nano"] >= 0 for r in settles)
            seen.append(_spent_nano(ckpt))
            assert seen[-1] <= limit_nano
            assert Fraction(seen[-1], NANO) >= _billed(srv, pin, pout)
            assert key not in out + err + str(result)
        assert seen[0] <= seen[1]
    for f in tmp.rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f
