"""The stall_events outbox: each alert is recorded with the flag, then posted to Slack; un-notified ones are retried.

A sweep posts the systemic alert and earlier un-notified alerts first, then its own; it posts at
most `MAX_POSTS_PER_SWEEP` (Slack webhooks take ~1 message/s) and stops at the first outage.
Each record's outcome (`notify_state`) is written back in one batch.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from typing import Any

from shared import alerts
from shared.log import log_event
from shared.model import STALL_EVENTS
from shared.sweeper.report import SweepReport
from shared.sweeper.rules.base import Query, Where
from shared.sweeper.store import StoredDoc, SweepStore

RETRY_WINDOW = dt.timedelta(hours=24)
STALL_EVENT_TTL = dt.timedelta(days=30)
# Slack incoming webhooks take ~1 message/s; a sweep posts at most this many, the rest wait.
MAX_POSTS_PER_SWEEP = 20
MAX_RETRIES_PER_SWEEP = 50


class NotifyState(str, enum.Enum):
    """Where a stall_events record's Slack post stands."""

    PENDING = "pending"  # recorded, not posted yet
    SENT = "sent"
    FAILED = "failed"  # failed or deferred: retried by a later sweep (within RETRY_WINDOW)
    SUPPRESSED = "suppressed"  # cooldown: never posted
    NOT_CONFIGURED = "not_configured"  # legacy records only: without a webhook alerts now stay pending
    ROLLED_UP = "rolled_up"  # over the post budget while a systemic alert covers it: not retried


# Un-notified alerts to retry; index stall_events (notify_state, detected_at).
UNNOTIFIED = Query(STALL_EVENTS, (
    Where("notify_state", "in", lambda now, cfg: [NotifyState.PENDING.value, NotifyState.FAILED.value]),
    Where("detected_at", ">=", lambda now, cfg: now - RETRY_WINDOW),
), limit=MAX_RETRIES_PER_SWEEP)


def stall_event_record(job_id: str, kind: str, severity: str, reason: str, now: dt.datetime, action: str,
                       message: alerts.SlackMessage | None, *, notify_state: NotifyState,
                       notify_error: str | None) -> dict:
    return {
        "job_id": job_id, "kind": kind, "severity": severity, "reason": reason, "action": action,
        "detected_at": now, "notified": False, "notify_state": notify_state.value, "notify_error": notify_error,
        "attempts": 0, "cooldown_key": job_id,
        "message_json": json.dumps(message.to_payload()) if message else None,
        "expire_at": now + STALL_EVENT_TTL,
    }


def _retry_queue(pending: list[StoredDoc]) -> list[tuple[str, alerts.SlackMessage, bool, int]]:
    """(event id, message, is a retry, attempts so far) for earlier un-notified records that carry a message."""
    queue = []
    for doc in pending:
        try:
            raw = json.loads(doc.data.get("message_json") or "{}")
            msg = alerts.SlackMessage(text=raw.get("text", ""), blocks=raw.get("blocks", []))
        except ValueError:
            continue
        if msg.text:
            queue.append((doc.id, msg, True, int(doc.data.get("attempts") or 0)))
    return queue


def post_outbox(store: SweepStore, pending: list[StoredDoc], outbox: list[tuple[str, alerts.SlackMessage]],
                url: str, now: dt.datetime, report: SweepReport, *, systemic_posted: bool = False,
                records: dict[str, dict] | None = None) -> None:
    """Posts the systemic alert and earlier un-notified alerts first, then this sweep's; bounded, and
    stops at the first outage. Outcomes are written back in one batch. `records`: this sweep's own
    stall_events records by id, so marking them needs no read (the pending ones were read by the scan)."""
    if systemic_posted and outbox:
        outbox = [outbox[-1]] + outbox[:-1]  # the systemic alert (last in) goes first
    queue = _retry_queue(pending) + [(event_id, msg, False, 0) for event_id, msg in outbox]
    if not url:
        # A sweep without the webhook (e.g. `upcfan sweep --no-alerts`, where the secret is not readable)
        # posts nothing and retires nothing: the alerts stay pending, with their cooldown already set, for
        # the next sweep that has it (the scheduled sweeper cannot start without it). Retiring them as
        # "not configured" lost them for good (issue 14, defect 10).
        report.alerts_held = len(queue)
        if queue:
            log_event("alerts_held", severity="WARNING", logger="upcfan.sweeper", count=len(queue),
                      reason="no Slack webhook in this sweep; left pending for the next sweep that has one")
        return
    outage: str | None = None
    posts = 0
    outcomes: list[tuple[str, dict[str, Any]]] = []
    for event_id, msg, is_retry, attempts in queue:
        if outage or posts >= MAX_POSTS_PER_SWEEP:
            outcomes.append((event_id, _not_posted(outage, rolled_up=systemic_posted and not is_retry)))
            report.notify_failed += 1
            continue
        posts += 1
        result = alerts.post_message(msg, webhook_url=url)
        outcomes.append((event_id, _posted(result, now, attempts + 1)))
        if result.ok:
            report.alerted += 1
            report.retried += 1 if is_retry else 0
            continue
        report.notify_failed += 1
        log_event("alert_failed", severity="WARNING", logger="upcfan.sweeper", error=result.error,
                  status=result.status)
        if result.transient:
            outage = result.error
    store.write_notify_outcomes(outcomes, {d.id: d.data for d in pending} | (records or {}))


def _outcome(state: NotifyState, error: str | None) -> dict[str, Any]:
    return {"notified": state is NotifyState.SENT, "notify_state": state.value, "notify_error": error}


def _not_posted(outage: str | None, *, rolled_up: bool) -> dict[str, Any]:
    """Over the post budget or after an outage: deferred to a later sweep, or rolled up into the systemic alert."""
    if rolled_up and not outage:
        return _outcome(NotifyState.ROLLED_UP, "over the per-sweep post budget; counted in the systemic alert")
    error = f"deferred: {outage}" if outage else "deferred: per-sweep post budget reached"
    return _outcome(NotifyState.FAILED, error)


def _posted(result: alerts.SlackPostResult, now: dt.datetime, attempts: int) -> dict[str, Any]:
    if result.ok:
        return _outcome(NotifyState.SENT, None) | {"notified_at": now, "attempts": attempts}
    return _outcome(NotifyState.FAILED, result.error) | {"attempts": attempts}
