"""The one retry policy: which faults are transient, and one named budget per kind of call.

Every retry in the product goes through a `RetryPolicy` declared here (Temporal-style: the budget
is data, stated once), so budgets cannot multiply by nesting one loop inside another and a change
of budget is one line. Policies retry inside one invocation only; retrying across invocations is
Cloud Tasks' job (queue `retry_config` in `shared/config.py`).
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from google.api_core import exceptions as gexc
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from shared.api_errors import is_aborted

T = TypeVar("T")

# Faults that say "nothing was decided, the same call may succeed later". Conflict (HTTP 409) is
# not here: over REST it means ALREADY_EXISTS as well as ABORTED; `is_transient` reads which.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.InternalServerError,
    gexc.TooManyRequests,
    gexc.ResourceExhausted,
    gexc.Aborted,
    ConnectionError,
)


def is_transient(exc: BaseException) -> bool:
    # A REST 409 ABORTED is a plain Conflict; gRPC raises Aborted (in TRANSIENT_ERRORS).
    return isinstance(exc, TRANSIENT_ERRORS) or isinstance(exc, gexc.Conflict) and is_aborted(exc)


def is_contention(exc: BaseException) -> bool:
    """A transaction lost to another one: ABORTED, or the Firestore client's own give-up, a
    ValueError ("failed to commit in N attempts") raised from the Aborted it kept getting."""
    if is_aborted(exc):
        return True
    return isinstance(exc, ValueError) and isinstance(exc.__cause__, gexc.Aborted)


# Outbound item-handler faults (`shared/handlers/errors.py` codes) that say "the same call may succeed
# in a moment": 5xx, 429, timeouts, refused or broken connections. Any other 4xx is an answer about
# the request itself; repeating it only repeats the answer.
OUTBOUND_TRANSIENT_CODES = frozenset({"marketplace_unavailable", "marketplace_timeout", "marketplace_rate_limited"})


def is_transient_outbound(exc: BaseException) -> bool:
    return bool(getattr(exc, "retryable", False)) and getattr(exc, "code", None) in OUTBOUND_TRANSIENT_CODES


def retry_after_s(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds a `Retry-After` header asks to wait: delay-seconds or an HTTP-date (RFC 9110, section
    10.2.3), never negative; None when absent or unreadable. `now` is wall time (for HTTP-dates)."""
    raw = (value or "").strip()
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:  # an HTTP-date is always GMT; a zone-less date is not one
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    """Up to `attempts` calls; between them an exponential wait from `initial_s`, capped at `max_s`,
    drawn from [10%, 100%] of it when `jitter` (so callers that failed together do not retry in step)."""

    name: str
    attempts: int
    initial_s: float
    max_s: float
    retry_if: Callable[[BaseException], bool] = field(default=is_transient, compare=False)
    jitter: bool = True

    def wait_s(self, attempt_number: int) -> float:
        """Seconds to wait after the `attempt_number`-th failed call (1-based)."""
        ceiling = min(self.max_s, self.initial_s * (2 ** (attempt_number - 1)))
        return random.uniform(ceiling / 10, ceiling) if self.jitter else ceiling

    def retrying(self, *, sleep: Callable[[float], None] | None = None) -> Retrying:
        kwargs: dict[str, Any] = {}
        if sleep is not None:
            kwargs["sleep"] = sleep
        return Retrying(
            retry=retry_if_exception(self.retry_if),
            stop=stop_after_attempt(self.attempts),
            wait=lambda state: self._wait(state),
            reraise=True,
            **kwargs,
        )

    def retrying_within(
        self,
        time_left: Callable[[], float],
        *,
        call_s: float = 0.0,
        min_wait_s: Callable[[BaseException], float | None] | None = None,
        before_retry: Callable[[int, BaseException, float], None] | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> Retrying:
        """This policy bounded by a time budget. The wait before a retry is the policy's jittered
        backoff, or longer when the fault asks for more (`min_wait_s`, e.g. its `Retry-After`); a
        retry whose wait plus one more call (`call_s`, that call's timeout) would not fit in
        `time_left()` is not made, and the last fault is raised as it was. `before_retry(attempt,
        fault, wait_s)` runs before each wait (to log it)."""

        def wait(state: RetryCallState) -> float:
            backoff = self.wait_s(state.attempt_number)
            asked = min_wait_s(state.outcome.exception()) if min_wait_s and state.outcome else None
            return max(backoff, asked or 0.0)

        def stop(state: RetryCallState) -> bool:
            # tenacity computes the wait before asking whether to stop: `upcoming_sleep` is that wait.
            return state.attempt_number >= self.attempts or state.upcoming_sleep + call_s > time_left()

        def before_sleep(state: RetryCallState) -> None:
            if before_retry is not None and state.outcome is not None:
                before_retry(state.attempt_number, state.outcome.exception(), state.upcoming_sleep)

        kwargs: dict[str, Any] = {"sleep": sleep} if sleep is not None else {}
        return Retrying(retry=retry_if_exception(self.retry_if), stop=stop, wait=wait, before_sleep=before_sleep,
                        reraise=True, **kwargs)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` under this policy; the last fault is raised as it was."""
        return self.retrying()(fn, *args, **kwargs)

    def api_core_retry(self, timeout_s: float):
        """The same policy for a Google client call that takes `retry=` (the client runs the loop),
        bounded by `timeout_s` in all."""
        from google.api_core import retry as api_retry

        return api_retry.Retry(predicate=self.retry_if, initial=self.initial_s, maximum=self.max_s,
                               multiplier=2.0, timeout=timeout_s)

    def _wait(self, state: RetryCallState) -> float:
        return self.wait_s(state.attempt_number)


# A Firestore transaction that lost to another one starts over fresh after a jittered pause: the
# emulator breaks a lock deadlock only by timing one side out, so transactions that retry in step
# would keep deadlocking. The client's own immediate retry is off (one attempt per transaction), so
# this is the only loop: at most 5 transaction bodies.
STORE_TRANSACTION = RetryPolicy("store_transaction", attempts=5, initial_s=0.2, max_s=1.6, retry_if=is_contention)

# A transaction whose result must not be lost (a finished handler's outcome: losing it costs a second
# run of the side effect) also outlasts a passing store fault, within the same one budget.
STORE_MUST_COMMIT = RetryPolicy("store_must_commit", attempts=6, initial_s=0.2, max_s=1.6,
                                retry_if=lambda exc: is_contention(exc) or is_transient(exc))

# Item creates at fan-out (`Store.create_items`, one BatchWrite per batch): the writes that failed
# with a transient status (or the whole request, on a transient fault) are sent again; a create
# that did land but whose answer was lost comes back ALREADY_EXISTS and reads as this line's own item.
STORE_BATCH_WRITE = RetryPolicy("store_batch_write", attempts=6, initial_s=0.2, max_s=1.6)

# CreateTask / GetTask: a transient API fault is retried in place, so one flaky call does not cost a
# whole chunk or retry round its place in line.
TASK_API = RetryPolicy("task_api", attempts=6, initial_s=0.2, max_s=5.0, jitter=False)

# Sweeper reads and its flag writes: a sweep must finish inside its scheduler deadline, so a fault
# that outlasts ~3 s surfaces and the next sweep tries again.
SWEEP_STORE = RetryPolicy("sweep_store", attempts=4, initial_s=0.1, max_s=1.0)

# Each outbound marketplace call (all idempotent: GETs, the inventory upsert PUT, the offer POST with
# its Idempotency-Key) is retried in place on a transient answer, so one 503 does not cost the whole
# attempt: at 30% 503 per call a four-call attempt succeeds 24% of the time unretried (measured: 23%
# of 1,000), and with up to 10 tries per call fails about once in 40,000 (0.3^10 per call). The attempt's time budget (`ItemContext.deadline`,
# `HANDLER_BUDGET_S`) bounds the loop before the tries run out in a longer outage; then the item goes
# back to its queue and Cloud Tasks retries it later.
OUTBOUND_HTTP = RetryPolicy("outbound_http", attempts=10, initial_s=0.2, max_s=8.0, retry_if=is_transient_outbound)

# Slack: a 429 with a short Retry-After is waited out once (`shared/alerts.py` honours the header);
# anything else waits for the next sweep, whose outbox re-sends it.
SLACK = RetryPolicy("slack", attempts=2, initial_s=0.0, max_s=0.0)

POLICIES = {p.name: p for p in (STORE_TRANSACTION, STORE_MUST_COMMIT, STORE_BATCH_WRITE, TASK_API, SWEEP_STORE, OUTBOUND_HTTP, SLACK)}
