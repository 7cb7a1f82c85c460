"""A scoring teacher that lies (issue 22, "On-policy over teacher.url"): every row is checked before
anything trains on it or is cached, 429 / 5xx are retried as generate retries them, a drip times
out, and the budget is never passed. A real HTTP server on 127.0.0.1 (tests/scoring_fault_server.py)."""

from __future__ import annotations

import json
import math
import sqlite3
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdforge.errors import BudgetExceededError, KdforgeError
from kdforge.teacher.pricing import Prices
from kdforge.teacher.scoring import PricedScorer, Retries, TeacherAnswerError
from scoring_fault_server import LIES, ScoringFaultServer

VOCAB = 512
IDS = [5, 17, 200, 3, 511, 42]  # the last position carries each lie


@pytest.fixture(scope="module")
def server():
    with ScoringFaultServer(VOCAB) as s:
        yield s


@pytest.fixture(autouse=True)
def fresh(server):
    server.faults.clear()
    server.big_k = False
    yield


def scorer(tmp, server, *, limit=None, price=1000.0, retries=None, top_k=5, log=None) -> PricedScorer:
    return PricedScorer(server.url, "lying-scorer", top_k, "KDFORGE_NO_SUCH_KEY", tmp, Prices(price, price, "test"),
                        limit, log=log or (lambda m: None), vocab_size=VOCAB,
                        retries=retries or Retries(max_retries=2, retry_base=0.01, retry_max=0.05, timeout=5.0))


def assert_true_rows(rows, ids, top_k):
    assert rows[0] is None and len(rows) == len(ids)
    for t in range(1, len(ids)):
        r = rows[t]
        assert ids[t] in r and len(r) <= top_k + 1
        assert all(0 <= i < VOCAB and math.isfinite(v) and v <= 0 for i, v in r.items())


def cached_rows(tmp) -> list:
    db = sqlite3.connect(tmp / "cache.sqlite")
    try:
        return [json.loads(b)["rows"] for (b,) in db.execute("SELECT body FROM responses")]
    finally:
        db.close()


@pytest.mark.parametrize("lie", LIES)
def test_a_lying_row_is_refused_naming_the_teacher_and_never_cached(tmp_path, server, lie):
    s = scorer(tmp_path, server)
    server.faults.append((lie, None))
    with pytest.raises(TeacherAnswerError) as e:
        s.score(IDS)
    msg = str(e.value)
    assert server.url in msg and "cannot be true" in msg and e.value.exit_code == 1, msg
    assert len(s.cache) == 0
    calls = server.calls
    rows, usd, hit = s.score(IDS)  # the teacher is fixed: scored again, paid again, never from the cache
    assert server.calls == calls + 1 and not hit and usd > 0
    assert_true_rows(rows, IDS, 5)
    s.close()


def test_more_alternatives_than_asked_are_cut_to_k_and_said_once(tmp_path, server):
    said = []
    s = scorer(tmp_path, server, log=said.append, top_k=3)
    server.big_k = True
    rows, _, _ = s.score(IDS)
    rows2, _, _ = s.score(IDS[::-1])
    assert_true_rows(rows, IDS, 3)
    assert_true_rows(rows2, IDS[::-1], 3)
    assert sum("more than the 3 alternatives" in m for m in said) == 1, said
    assert all(len(r) <= 4 for rows in cached_rows(tmp_path) for r in rows if r)
    s.close()


def test_nan_rows_an_older_kdforge_cached_are_scored_again(tmp_path, server):
    s = scorer(tmp_path, server)
    s.score(IDS)
    db = sqlite3.connect(tmp_path / "cache.sqlite")
    key, body = db.execute("SELECT key, body FROM responses").fetchone()
    db.close()
    poisoned = json.loads(body)
    poisoned["rows"][-1] = [[IDS[-1], float("nan")]]
    s.cache.put(key, poisoned)  # what the unchecked scorer cached
    calls = server.calls
    rows, _, hit = s.score(IDS)
    assert not hit and server.calls == calls + 1
    assert_true_rows(rows, IDS, 5)
    s.close()


def test_429_honours_retry_after_and_costs_nothing_5xx_is_retried_at_worst_case(tmp_path, server):
    s = scorer(tmp_path, server)
    server.faults.extend([("429", 1), ("429", 0)])
    t0 = time.monotonic()
    rows, usd, _ = s.score(IDS)
    assert time.monotonic() - t0 >= 0.95  # the first 429's Retry-After: 1
    assert_true_rows(rows, IDS, 5)
    assert usd == pytest.approx(len(IDS) * 1e-3)  # the 429s were refused before any work: free
    server.faults.append(("500", None))
    rows, usd, _ = s.score(IDS[:4])
    assert usd == pytest.approx(2 * 4 * 1e-3)  # the 5xx's outcome is unknown: charged its worst case
    s.close()


def test_a_slow_drip_hits_the_whole_request_deadline(tmp_path, server):
    s = scorer(tmp_path, server, retries=Retries(max_retries=0, retry_base=0.01, retry_max=0.01, timeout=1.0))
    server.faults.append(("drip", None))  # ~300 bytes at 2 bytes/s: two and a half minutes
    t0 = time.monotonic()
    with pytest.raises(KdforgeError, match="generate.max_retries") as e:
        s.score(IDS)
    assert time.monotonic() - t0 < 4, "the drip held the request past its deadline"
    assert "whole answer within 1 s" in str(e.value)
    s.close()


def test_a_400_is_exit_2_quoting_the_teacher_and_costs_nothing(tmp_path, server):
    s = scorer(tmp_path, server)
    server.faults.append(("400", None))
    with pytest.raises(KdforgeError) as e:
        s.score(IDS)
    assert e.value.exit_code == 2 and "prompt_logprobs is not supported" in str(e.value), str(e.value)
    assert s.spent == 0 and server.calls >= 1
    s.close()


def test_a_429_storm_past_the_retry_limit_stops_with_exit_1(tmp_path, server):
    s = scorer(tmp_path, server, retries=Retries(max_retries=1, retry_base=0.01, retry_max=0.01, timeout=5.0))
    server.faults.extend([("429", 0)] * 10)
    with pytest.raises(KdforgeError) as e:
        s.score(IDS)
    assert e.value.exit_code == 1 and "gave no scores after 5 attempts" in str(e.value), str(e.value)
    assert s.spent == 0
    s.close()


FAULTS = st.one_of(st.tuples(st.sampled_from(LIES), st.none()),
                   st.tuples(st.sampled_from(["429", "500", "garbage", "big_k", "drip"]), st.just(0)),
                   st.tuples(st.just("ok"), st.none()))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(faults=st.lists(FAULTS, max_size=12), limit=st.floats(0.0, 0.05),
       seqs=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=2, max_size=9), min_size=1, max_size=6))
def test_whatever_the_teacher_does_the_budget_holds_and_only_true_rows_come_back(tmp_path_factory, server,
                                                                                 faults, limit, seqs):
    """Lies, 429 storms, 5xx, garbage, 300 alternatives and drips in any order, any budget: the
    budget is never passed, every answer that comes back is true (K capped), every stop says why,
    and nothing the checks refuse is in the cache."""
    tmp = tmp_path_factory.mktemp("storm")
    server.faults.clear()
    server.faults.extend((None, None) if f == "ok" else (f, n) for f, n in faults)
    s = scorer(tmp, server, limit=limit,  # a drip runs into a 0.4 s deadline
               retries=Retries(max_retries=2, retry_base=0.01, retry_max=0.05, timeout=0.4))
    for ids in seqs:
        try:
            rows, _, _ = s.score(ids)
        except (TeacherAnswerError, BudgetExceededError) as e:
            assert str(e) and "Traceback" not in str(e)
            continue
        except KdforgeError as e:  # out of retries: says so
            assert "attempts" in str(e)
            continue
        assert_true_rows(rows, ids, 5)
        assert s.spent <= limit + 1e-12
    assert s.spent <= limit + 1e-12
    s.close()
    for rows in cached_rows(tmp):  # nothing the checks refuse was cached
        assert all(all(math.isfinite(v) and v <= 0 and 0 <= i < VOCAB for i, v in r) for r in rows[1:])
