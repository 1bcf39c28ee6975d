"""Deadlines that add up: each task kind's worst-case time, its dispatch deadline, and the timeout of
the function it calls, written once (docs/architecture.md, "Queues"; docs/operations.md, "Function
sizing").

For every task kind (`shared.tasks.TASK_KINDS`):

    budget_s(kind)  <  kind.dispatch_deadline_s  <=  function_timeout_s(kind.function)

- budget < deadline: the answer reaches Cloud Tasks before it gives up on the attempt. An attempt
  cut at its deadline counts as failed and is dispatched again while the first request may still
  run; on an item's last attempt nothing re-drives the item afterwards.
- deadline <= timeout: the function never kills a request Cloud Tasks is still waiting for. A
  function's timeout is the largest deadline of the kinds that call it (worker: items and progress
  checks; ingest: plans and chunks); `infra/deploy.py` takes it from here.

The budgets add the waits and outbound calls the code bounds (per-call timeouts, retry policies'
waits, the last attempt's wait cap, the item handler's time budget) plus a stated allowance for the store and Cloud Tasks calls
themselves, which carry no client timeout of their own. A marketplace call is bounded by its
connect timeout plus one read timeout: `requests` applies the read timeout between bytes, so a
server trickling a body could exceed it (the sandbox and the real API answer in one read).
"""

from __future__ import annotations

from dataclasses import replace

from shared.alerts import MAX_RETRY_AFTER_WAIT_S, WEBHOOK_TIMEOUT_S
from shared.config import load_settings
from shared.handlers import marketplace_draft
from shared.handlers.base import HANDLER_BUDGET_S
from shared.retry import SLACK, STORE_MUST_COMMIT, STORE_TRANSACTION, TASK_API, RetryPolicy
from shared.tasks import CHUNK_TASK, ITEM_TASK, PLAN_TASK, PROGRESS_TASK, RESULTS_TASK, TASK_KINDS, TaskKind
from shared.worker.lanes import BULK_YIELD_MAX_S
from shared.worker.lease import LAST_ATTEMPT_POLL_S, LAST_ATTEMPT_WAIT_MAX_S

# Time of the store and Cloud Tasks calls themselves (claim, complete, job read, count aggregations,
# CreateTask) on one delivery, beyond the retry waits counted below: an allowance, not a bound.
STORE_CALLS_ALLOWANCE_S = 15.0

# A chunk creates up to one CreateTask per line: chunk_bytes / the shortest line (an 8-digit EAN-8
# and its newline), `fanout_threads` at a time, each call at this nominal latency. An estimate, not
# a bound (a chunk that overruns is dispatched again and resumes: task names deduplicate).
SHORTEST_LINE_BYTES = 9
CREATE_TASK_NOMINAL_S = 0.1

# A plan streams the whole file once: up to max_lines lines of this many bytes (a UPC with a few CSV
# columns), downloaded and scanned at this rate (scanning alone measured ~100 MB/s in memory, so the
# download dominates), then one CreateTask per chunk, one at a time.
PLAN_LINE_BYTES = 64
PLAN_READ_BYTES_PER_S = 10e6


def retry_waits_s(policy: RetryPolicy) -> float:
    """The longest a policy sleeps between its calls in all (each wait at its jitter ceiling)."""
    ceiling = replace(policy, jitter=False)
    return sum(ceiling.wait_s(n) for n in range(1, policy.attempts))


def marketplace_pass_s() -> float:
    """One pass of the marketplace draft handler with no retry: every call at connect + read timeout."""
    per_call = marketplace_draft.CONNECT_TIMEOUT_S + marketplace_draft.READ_TIMEOUT_S
    return marketplace_draft.MAX_CALLS * per_call


def marketplace_handler_s() -> float:
    """Worst case of the marketplace draft handler: its time budget (`HANDLER_BUDGET_S`, the item's
    `ItemContext.deadline`). It starts no call, first or retry, that would not end by then at its
    timeouts, so its in-attempt retries (`OUTBOUND_HTTP`) live inside the budget, not on top of it."""
    return HANDLER_BUDGET_S


def slack_note_s() -> float:
    """Worst case of one Slack post (`shared.alerts.post_to_slack`): each attempt at its timeout,
    with the short Retry-After waits between them."""
    return SLACK.attempts * WEBHOOK_TIMEOUT_S + (SLACK.attempts - 1) * MAX_RETRY_AFTER_WAIT_S


def item_budget_s() -> float:
    """An item delivery on its last attempt: a bulk delivery's wait for small jobs' deliveries
    (capped), wait for a holder (capped, plus the poll it may overrun by), claim (transaction
    retries), the handler (its time budget, retries included), complete (must-commit retries), then
    the progress check's CreateTask (API retries). The holder wait is counted while a task has a last
    attempt (item queue max_attempts > 0)."""
    wait = BULK_YIELD_MAX_S + LAST_ATTEMPT_WAIT_MAX_S + LAST_ATTEMPT_POLL_S
    retries = retry_waits_s(STORE_TRANSACTION) + retry_waits_s(STORE_MUST_COMMIT) + retry_waits_s(TASK_API)
    return wait + marketplace_handler_s() + retries + STORE_CALLS_ALLOWANCE_S


def progress_budget_s() -> float:
    """A progress check: a bulk job's wait for small jobs' deliveries (capped), count aggregations, the
    completion transaction, one job-finished Slack note."""
    return BULK_YIELD_MAX_S + retry_waits_s(STORE_TRANSACTION) + slack_note_s() + STORE_CALLS_ALLOWANCE_S


def chunk_estimate_s() -> float:
    """A chunk's fan-out at the default chunk size and threads (an estimate: see CREATE_TASK_NOMINAL_S)."""
    s = load_settings()
    lines = s.chunk_bytes // SHORTEST_LINE_BYTES
    return lines / s.fanout_threads * CREATE_TASK_NOMINAL_S + STORE_CALLS_ALLOWANCE_S


def plan_estimate_s() -> float:
    """A plan of the largest file ingest accepts (an estimate: see PLAN_READ_BYTES_PER_S)."""
    s = load_settings()
    size = s.max_lines * PLAN_LINE_BYTES
    return size / PLAN_READ_BYTES_PER_S + size / s.chunk_bytes * CREATE_TASK_NOMINAL_S + STORE_CALLS_ALLOWANCE_S


# A results manifest reads every item and line record of the largest job once, a page at a time, and
# uploads the CSV as it goes: at this nominal rate of rows (Firestore streams pages of 1,000 documents).
RESULTS_ROWS_PER_S = 5_000


def results_estimate_s() -> float:
    """The results manifest of the largest job ingest accepts (an estimate: see RESULTS_ROWS_PER_S)."""
    return load_settings().max_lines / RESULTS_ROWS_PER_S + STORE_CALLS_ALLOWANCE_S


BUDGETS = {ITEM_TASK.name: item_budget_s, PROGRESS_TASK.name: progress_budget_s, CHUNK_TASK.name: chunk_estimate_s,
           PLAN_TASK.name: plan_estimate_s, RESULTS_TASK.name: results_estimate_s}


def budget_s(kind: TaskKind) -> float:
    return BUDGETS[kind.name]()


def function_timeout_s(function: str) -> int:
    """A function's timeout: the largest dispatch deadline of the task kinds that call it."""
    deadlines = [k.dispatch_deadline_s for k in TASK_KINDS if k.function == function]
    if not deadlines:
        raise KeyError(f"no task kind calls {function!r}; its timeout is not derived from a deadline")
    return max(deadlines)
