"""The one retry policy (shared/retry.py): the outbound budget loop with a fake clock and sleep, and
Retry-After parsing (issue 15: a 429's Retry-After was recorded, not honoured; no in-attempt retry)."""

from __future__ import annotations

import email.utils

import pytest

from shared.exceptions import PermanentItemError, RetryableItemError
from shared.retry import OUTBOUND_HTTP, POLICIES, RetryPolicy, is_transient_outbound, retry_after_s

NOW = 1_800_000_000.0


class Clock:
    def __init__(self):
        self.t = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def _unavailable(retry_after: str | None = None) -> RetryableItemError:
    details = {"status": 503, **({"retry_after": retry_after} if retry_after else {})}
    return RetryableItemError("offer lookup: GET /offer answered 503", code="marketplace_unavailable", details=details)


def _flaky(faults: list[BaseException], calls: list[float], clock: Clock):
    def call():
        calls.append(clock())
        if faults:
            raise faults.pop(0)
        return "ok"
    return call


@pytest.mark.parametrize("value,expected", [
    ("7", 7.0), (" 0 ", 0.0), ("1.5", 1.5), ("-3", 0.0),
    (email.utils.formatdate(NOW + 42, usegmt=True), 42.0),
    (email.utils.formatdate(NOW - 42, usegmt=True), 0.0),  # a date in the past: no wait asked
    ("Sun, 06 Nov 1994 08:49:37", None),  # no zone: not an HTTP-date
    ("soon", None), ("", None), (None, None),
])
def test_retry_after_in_seconds_or_as_an_http_date(value, expected):
    got = retry_after_s(value, now=NOW)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_transient_outbound_is_5xx_429_timeouts_and_connection_errors_only():
    assert OUTBOUND_HTTP is POLICIES["outbound_http"] and OUTBOUND_HTTP.attempts > 1
    for code in ("marketplace_unavailable", "marketplace_timeout", "marketplace_rate_limited"):
        assert is_transient_outbound(RetryableItemError("x", code=code))
    for err in (PermanentItemError("x", code="marketplace_rejected"), PermanentItemError("x", code="marketplace_unauthorized"),
                RetryableItemError("x", code="marketplace_bad_response"), RetryableItemError("x", code="handler_crashed"),
                ValueError("x")):
        assert not is_transient_outbound(err)


def test_retries_with_jittered_exponential_backoff_until_success():
    clock, calls = Clock(), []
    policy = RetryPolicy("t", attempts=5, initial_s=1.0, max_s=3.0, retry_if=is_transient_outbound)
    seen = []
    retrying = policy.retrying_within(lambda: 100.0 - clock(), sleep=clock.sleep,
                                      before_retry=lambda n, exc, wait: seen.append((n, wait)))
    assert retrying(_flaky([_unavailable()] * 3, calls, clock)) == "ok"
    assert len(calls) == 4 and [n for n, _ in seen] == [1, 2, 3]
    for (n, wait), ceiling in zip(seen, (1.0, 2.0, 3.0)):  # doubling, capped at max_s
        assert ceiling / 10 <= wait <= ceiling
    assert [w for _, w in seen] == clock.sleeps


def test_retry_after_is_the_least_wait():
    clock, calls = Clock(), []
    policy = RetryPolicy("t", attempts=3, initial_s=0.1, max_s=0.1, retry_if=is_transient_outbound)
    retrying = policy.retrying_within(lambda: 100.0 - clock(), sleep=clock.sleep,
                                      min_wait_s=lambda exc: retry_after_s(exc.details.get("retry_after")))
    assert retrying(_flaky([_unavailable("9")], calls, clock)) == "ok"
    assert clock.sleeps == [9.0]


def test_attempts_bound_the_loop_and_the_last_fault_is_raised_as_it_was():
    clock, calls = Clock(), []
    policy = RetryPolicy("t", attempts=3, initial_s=0.1, max_s=0.1, retry_if=is_transient_outbound)
    faults = [_unavailable(), _unavailable(), _unavailable("1")]
    last = faults[-1]
    with pytest.raises(RetryableItemError) as exc:
        policy.retrying_within(lambda: 100.0, sleep=clock.sleep)(_flaky(faults, calls, clock))
    assert exc.value is last and len(calls) == 3


def test_a_retry_whose_wait_and_call_pass_the_budget_is_not_made():
    clock, calls = Clock(), []
    policy = RetryPolicy("t", attempts=10, initial_s=1.0, max_s=8.0, jitter=False, retry_if=is_transient_outbound)
    deadline = 20.0
    with pytest.raises(RetryableItemError):
        policy.retrying_within(lambda: deadline - clock(), call_s=5.0, sleep=clock.sleep)(
            _flaky([_unavailable()] * 10, calls, clock))
    # waits 1, 2, 4, 8: the call at t=15 may still end by its 5 s timeout at 20; another 8 s wait would not fit
    assert clock.sleeps == [1.0, 2.0, 4.0, 8.0] and calls == [0.0, 1.0, 3.0, 7.0, 15.0]
    assert all(t + 5.0 <= deadline for t in calls)


def test_a_retry_after_beyond_the_budget_ends_the_loop_at_once():
    clock, calls = Clock(), []
    with pytest.raises(RetryableItemError):
        OUTBOUND_HTTP.retrying_within(lambda: 30.0 - clock(), call_s=13.0, sleep=clock.sleep,
                                      min_wait_s=lambda exc: retry_after_s(exc.details.get("retry_after")))(
            _flaky([_unavailable("20")] * 2, calls, clock))
    assert clock.sleeps == [] and len(calls) == 1


def test_a_permanent_fault_is_not_retried():
    clock, calls = Clock(), []
    fault = PermanentItemError("inventory item upsert: PUT answered 400", code="marketplace_rejected")
    with pytest.raises(PermanentItemError):
        OUTBOUND_HTTP.retrying_within(lambda: 100.0, sleep=clock.sleep)(_flaky([fault], calls, clock))
    assert len(calls) == 1 and clock.sleeps == []
