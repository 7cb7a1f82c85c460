"""The one retry rule generate's samples and the priced scorer share (client.RetryCount): how long
to wait after a 429 or a transient failure, and when a request is out of retries."""

from __future__ import annotations

import random

import pytest

from kdforge.teacher.client import RATE_LIMIT_RETRIES_PER_RETRY, RateLimited, RetryCount, Transient, backoff_delay


def throttled(retry_after=None):
    return RateLimited("429 trop de requêtes — 请稍后", retry_after=retry_after)


def down(retry_after=None, kind="5xx"):
    return Transient("503 indisponible — 服务不可用", kind, billed=True, retry_after=retry_after)


def test_a_429_waits_its_retry_after_and_is_retried_four_times_longer():
    tries = RetryCount(max_retries=2, base=1.0, cap=60.0, rng=random.Random(0))
    limit = RATE_LIMIT_RETRIES_PER_RETRY * 2
    for _ in range(limit):
        assert tries.after(throttled(retry_after=7.5)) == (7.5, False)
    assert tries.after(throttled(retry_after=7.5)) == (7.5, True)  # one too many
    assert (tries.rate_limited, tries.transient, tries.failures) == (limit + 1, 0, limit + 1)


def test_a_429_without_retry_after_backs_off_by_its_own_count():
    seeded, mine = random.Random(3), random.Random(3)
    tries = RetryCount(max_retries=0, base=0.5, cap=30.0, rng=mine)
    for n in range(1, RATE_LIMIT_RETRIES_PER_RETRY + 1):  # max_retries 0 still allows 4 429s
        wait, gave_up = tries.after(throttled())
        assert wait == backoff_delay(n, 0.5, 30.0, seeded) and not gave_up
    assert tries.after(throttled())[1]


def test_a_transient_failure_waits_the_longer_of_retry_after_and_backoff_up_to_max_retries():
    seeded = random.Random(5)
    tries = RetryCount(max_retries=3, base=2.0, cap=60.0, rng=random.Random(5))
    waits = [tries.after(down(retry_after=ra, kind=kind)) for ra, kind in ((100.0, "5xx"), (None, "timeout"),
                                                                          (0.0, "dropped"))]
    expected = [backoff_delay(n, 2.0, 60.0, seeded) for n in (1, 2, 3)]
    assert waits == [(100.0, False), (expected[1], False), (expected[2], False)]
    wait, gave_up = tries.after(down())
    assert gave_up and wait == backoff_delay(4, 2.0, 60.0, seeded)  # the draw is made even then


def test_429s_and_transient_failures_count_apart():
    tries = RetryCount(max_retries=1, base=0.01, cap=0.01, rng=random.Random(0))
    assert not tries.after(down())[1]
    for _ in range(RATE_LIMIT_RETRIES_PER_RETRY):
        assert not tries.after(throttled(retry_after=0.0))[1]  # a 429 does not use up the 5xx retry
    assert tries.after(down())[1]
    assert tries.failures == RATE_LIMIT_RETRIES_PER_RETRY + 2


@pytest.mark.parametrize("max_retries", [0, 1, 4])
def test_max_retries_is_the_number_of_transient_retries(max_retries):
    tries = RetryCount(max_retries=max_retries, base=0.01, cap=0.01, rng=random.Random(0))
    outcomes = [tries.after(down())[1] for _ in range(max_retries + 1)]
    assert outcomes == [False] * max_retries + [True]
