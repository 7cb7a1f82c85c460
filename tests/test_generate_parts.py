"""The parts of generate, one at a time: rate limiter (fake clock), backoff and Retry-After,
budget ledger (reservations, persistence, a killed run), cache keys, prompts, prices, journal."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from kdforge.errors import BudgetExceededError, DataError, UsageError
from kdforge.teacher.budget import BudgetLedger, Reservation, usage_problem
from kdforge.teacher.cache import request_key
from kdforge.teacher.client import backoff_delay, mask_secret, retry_after_seconds
from kdforge.teacher.journal import Journal, repair_torn_tail
from kdforge.teacher.pricing import Prices, lookup, resolve_prices
from kdforge.teacher.prompts import BUILTIN_SOURCES, builtin_prompts, plan_prompts, prompt_key, read_prompt_file
from kdforge.teacher.ratelimit import RateLimiter, parse_duration


# ----------------------------------------------------------------------------- rate limiter

class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    async def sleep(self, dt: float) -> None:
        self.t += dt
        await asyncio.sleep(0)


def _starts(limiter: RateLimiter, clock: FakeClock, n: int, tokens: int = 0) -> list[float]:
    async def go():
        out = []

        async def one():
            await limiter.acquire(tokens)
            out.append(round(clock.t, 6))
            limiter.observe({})

        await asyncio.gather(*(one() for _ in range(n)))
        return sorted(out)

    return asyncio.run(go())


def test_limiter_paces_requests_and_tokens_per_minute():
    c = FakeClock()
    assert _starts(RateLimiter(rpm=600, clock=c, sleep=c.sleep, probe=False), c, 5) == [0.0, 0.1, 0.2, 0.3, 0.4]
    c = FakeClock()  # 6000 tokens/min, 200 tokens each: one start per 2 s
    assert _starts(RateLimiter(tpm=6000, clock=c, sleep=c.sleep, probe=False), c, 3, tokens=200) == [0.0, 2.0, 4.0]
    c = FakeClock()  # --delay is a minimum gap between starts
    assert _starts(RateLimiter(min_gap=20, clock=c, sleep=c.sleep, probe=False), c, 3) == [0.0, 20.0, 40.0]


def test_limiter_shared_pause_holds_every_worker_then_resumes_paced():
    c = FakeClock()
    lim = RateLimiter(rpm=600, clock=c, sleep=c.sleep, probe=False)
    lim.pause(1.5)
    assert _starts(lim, c, 3) == [1.5, 1.6, 1.7]


@pytest.mark.parametrize("remaining, expected", [("7", [0.15, 0.2, 0.3]),  # an overloaded teacher: quota left
                                                  ("0", [0.15, 0.25, 0.35])])  # the limit is spent: no catch-up
def test_limiter_after_a_429_catches_up_only_if_quota_is_left(remaining, expected):
    c = FakeClock()
    lim = RateLimiter(rpm=600, clock=c, sleep=c.sleep, probe=False)
    assert _starts(lim, c, 1) == [0.0]
    lim.on_429(0.15, {"x-ratelimit-remaining-requests": remaining})
    assert _starts(lim, c, 3) == expected


def test_limiter_learns_tier_from_headers_and_probes_first():
    c = FakeClock()
    logs = []
    lim = RateLimiter(clock=c, sleep=c.sleep, log=logs.append)
    order = []

    async def go():
        async def first():
            await lim.acquire()
            order.append(("probe", c.t))
            await c.sleep(0.3)  # the probe's answer carries the tier
            lim.observe({"x-ratelimit-limit-requests": "120", "x-ratelimit-limit-tokens": "90000",
                         "x-ratelimit-remaining-requests": "119", "x-ratelimit-reset-requests": "500ms"})

        async def other():
            await asyncio.sleep(0)
            await lim.acquire()
            order.append(("next", c.t))

        await asyncio.gather(first(), other(), other())

    asyncio.run(go())
    assert order[0] == ("probe", 0.0)
    assert [t for _, t in order[1:]] == [pytest.approx(0.5), pytest.approx(1.0)]  # none before the probe's answer
    assert lim.rpm == 120 and lim.tpm == 90000
    assert logs and "120 requests/min" in logs[0] and "90000 tokens/min" in logs[0]
    lim.observe({"x-ratelimit-limit-requests": "120"})
    assert len(logs) == 1  # logged once, not on every answer
    assert RateLimiter(rpm=60, clock=c, sleep=c.sleep).rpm == 60
    both = RateLimiter(rpm=60, clock=c, sleep=c.sleep)
    both.observe({"x-ratelimit-limit-requests": "600"})
    assert both.rpm == 60  # the lower of flag and header wins


def test_durations_retry_after_and_backoff():
    assert parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("6m0s") == 360 and parse_duration("1h2m3.5s") == pytest.approx(3723.5)
    assert parse_duration("1.5") == 1.5 and parse_duration("soon") is None
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == pytest.approx(0.25)
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a date in the past
    assert retry_after_seconds({}) is None
    rng = random.Random(0)
    for attempt in range(1, 12):
        d = min(30.0, 0.5 * 2 ** (attempt - 1))
        samples = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(50)]
        assert all(d / 2 <= x <= d for x in samples) and len(set(samples)) > 1  # grows, capped, jittered


# ----------------------------------------------------------------------------- budget ledger

P = Prices(input=10.0, output=1000.0, source="test")  # USD per million tokens


def test_ledger_reserves_worst_case_and_refuses_to_cross_the_limit(tmp_path):
    led = BudgetLedger(tmp_path / "budget.jsonl", P, limit=0.10)
    a = led.try_reserve(100, 50)  # 0.001 + 0.05
    assert a is not None and led.reserved == pytest.approx(0.051)
    assert led.try_reserve(100, 50) is None  # 0.102 > 0.10: never sent
    assert led.settle(a, 80, 40, "ok") == pytest.approx(0.0408)
    b = led.try_reserve(100, 50)
    assert b is not None  # 0.0408 + 0.051 fits now
    led.settle_worst(b, "timeout")  # unknown outcome: the whole reservation is spent
    assert led.spent == pytest.approx(0.0918) and led.reserved == 0

    async def go():
        return await led.reserve(100, 50)

    with pytest.raises(BudgetExceededError, match=r"spent \$0\.0918 of \$0\.1000"):
        asyncio.run(go())  # nothing in flight could free room: raise instead of waiting forever
    led.close()


def test_ledger_waiters_get_room_when_in_flight_requests_settle(tmp_path):
    led = BudgetLedger(None, P, limit=0.11)

    async def go():
        first = led.try_reserve(100, 50)
        second = led.try_reserve(100, 50)
        assert led.try_reserve(100, 50) is None
        waiter = asyncio.create_task(led.reserve(100, 50))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        led.settle(first, 10, 5, "ok")  # a short answer frees most of its reservation
        third = await asyncio.wait_for(waiter, 1)
        led.settle(second, 10, 5, "ok")
        led.settle(third, 10, 5, "ok")

    asyncio.run(go())
    assert led.spent <= 0.11


def test_ledger_persists_across_runs_and_counts_a_killed_runs_flight_at_worst_case(tmp_path):
    path = tmp_path / "budget.jsonl"
    led = BudgetLedger(path, P, limit=1.0)
    led.settle(led.try_reserve(100, 50), 100, 50, "ok")
    led.try_reserve(200, 50)  # in flight when the process is SIGKILLed: no settle line
    with open(path, "a") as f:
        f.write('{"op": "reserve", "rid": 99, "na')  # torn last line
    led.close()

    again = BudgetLedger(path, P, limit=1.0)
    assert again.recovered == 1
    assert again.spent == pytest.approx(0.051 + 0.052)  # the orphan reservation counts in full
    assert len(path.read_text().splitlines()) == 1  # compacted to one carry line
    again.close()
    assert BudgetLedger(path, P, readonly=True).spent == pytest.approx(0.103)
    with pytest.raises(ValueError):
        BudgetLedger(None, None, limit=1.0)  # a budget without prices is refused


# ----------------------------------------------------------------------------- cache keys

def test_cache_key_covers_url_model_messages_and_every_parameter():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0.7}
    k = request_key("http://h/v1", body)
    assert k == request_key("http://h/v1/", dict(reversed(list(body.items()))))  # canonical
    for change in ({"model": "m2"}, {"max_tokens": 6}, {"temperature": 0.0}, {"top_p": 0.9}, {"top_logprobs": 2},
                   {"messages": [{"role": "user", "content": "hi!"}]}):
        assert request_key("http://h/v1", {**body, **change}) != k
    assert request_key("http://other/v1", body) != k


# ----------------------------------------------------------------------------- prompts

def test_builtin_mix_is_diverse_unique_and_sampled_by_seed():
    prompts = builtin_prompts()
    assert len(prompts) >= 250 and {p.source for p in prompts} == set(BUILTIN_SOURCES)
    assert len({prompt_key(p.messages) for p in prompts}) == len(prompts)
    a, b, c = plan_prompts([], {}, 0), plan_prompts([], {}, 0), plan_prompts([], {}, 1)
    assert a == b and a != c and sorted(map(repr, a)) == sorted(map(repr, c))
    first20 = {p.source for p in a[:20]}
    assert len(first20) >= 4  # interleaved, not one category after another


def test_prompt_files_dedup_mix_weights_and_errors(tmp_path):
    f1 = tmp_path / "alpha.jsonl"
    rows = [{"prompt": f"alpha question {i}"} for i in range(200)]
    rows += [{"prompt": "Alpha   QUESTION 3"}, {"messages": [{"role": "user", "content": "chat q"},
                                                             {"role": "assistant", "content": "old answer"}]}]
    f1.write_text("".join(json.dumps(r) + "\n" for r in rows))
    f2 = tmp_path / "beta.txt"
    f2.write_text("\n".join(f"beta question {i}" for i in range(200)) + "\n\n")
    got = read_prompt_file(f1)
    assert got[-1].messages == (("user", "chat q"),) and got[0].source == "alpha"  # trailing answer dropped
    plan = plan_prompts([str(f1), str(f2)], {}, 0)
    assert len(plan) == 401  # the case/whitespace duplicate is gone
    mixed = plan_prompts([str(f1), str(f2)], {"alpha": 3, "beta": 1}, 0)[:100]
    n_alpha = sum(p.source == "alpha" for p in mixed)
    assert 62 <= n_alpha <= 88  # ~75 expected
    with_builtin = plan_prompts([str(f2)], {"beta": 1, "math": 1}, 0)
    assert {p.source for p in with_builtin} == {"beta", "math"}
    with pytest.raises(UsageError, match="available"):
        plan_prompts([str(f2)], {"gamma": 1}, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        read_prompt_file(bad)


# ----------------------------------------------------------------------------- prices

def test_prices_from_flags_table_or_nothing():
    assert resolve_prices("x", 1.0, 2.0) == Prices(1.0, 2.0, "--price-input/--price-output")
    assert lookup("gpt-4o-mini").output > 0
    assert lookup("gpt-4o-mini-2024-07-18") == lookup("gpt-4o-mini")  # dated snapshot
    assert "as of" in lookup("kimi-k2").source
    assert resolve_prices("some-local-model", None, None) is None  # unknown: never $0
    with pytest.raises(UsageError, match="--price-output"):
        resolve_prices("x", 1.0, None)


# ----------------------------------------------------------------------------- journal

def test_journal_repairs_a_torn_tail_and_refuses_foreign_lines(tmp_path):
    out = tmp_path / "kd.jsonl"
    good = {"id": "a", "prompt": "p", "teacher_text": "t"}
    out.write_text(json.dumps(good) + "\n" + '{"id": "b", "prompt": "half')
    j = Journal(out)
    assert j.repaired_bytes > 0 and j.count == 1 and j.done("a", "?")
    j.append({"id": "c", "prompt": "q", "teacher_text": "u"}, prompt_key([{"role": "user", "content": "q"}]))
    j.close()
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["a", "c"]
    assert repair_torn_tail(out) == 0
    out.write_text("not json\n")
    with pytest.raises(DataError, match=r"kd\.jsonl:1"):
        Journal(out)


def test_mask_secret_masks_the_whole_text_before_cutting_and_trailing_key_pieces():
    key = "sk-SECRETKEY-0123456789abcdef"
    for at in range(280, 301):  # wherever the key starts around the cut
        text = mask_secret("x" * at + key + " and more", key)
        assert len(text) <= 300 and "SECRET" not in text and not text.endswith(("sk-S", "sk-SE"))
    assert mask_secret("echo " + key[:10], key) == "echo ***"  # a server that cut its own message mid-key
    assert mask_secret("short k3y! here", "k3y!") == "short *** here"  # short keys are masked too
    assert mask_secret("nothing to hide", None) == "nothing to hide"


@pytest.mark.parametrize("usage,problem", [((3, 4), None), (None, "no usage"), ((None, 4), "no usage"),
                                           ((-1, 4), "negative"), ((3, "lots"), "whole number"),
                                           ((True, 4), "whole number"), ((3.0, 4), "whole number"),
                                           ((3, 11), "more than the request"), ((10**12, 1), "more than the request")])
def test_usage_problem_trusts_only_whole_numbers_within_the_request(usage, problem):
    res = Reservation(1, 100, prompt_tokens=50, completion_tokens=10)
    got = usage_problem(usage, res)
    assert (got is None) if problem is None else (problem in got)
