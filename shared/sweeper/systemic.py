"""The systemic alert: one CRITICAL post when many jobs stalled within the hour (a shared cause), itself cooled down.

Counted with one aggregation over `alert_state` (`episode_at >= now - 1h`, one doc per job, automatic
single-field index); `alert_state/systemic` is read only when the count reaches the threshold.
"""

from __future__ import annotations

import datetime as dt

from shared import alerts
from shared.config import Settings
from shared.log import log_event
from shared.model import ALERT_STATE
from shared.sweeper.decisions import FlagAction, decide_systemic
from shared.sweeper.findings import Severity
from shared.sweeper.outbox import NotifyState, stall_event_record
from shared.sweeper.rules.base import Query, Where
from shared.sweeper.store import AddStallEvent, MergeAlertState, SweepStore

SYSTEMIC_WINDOW = dt.timedelta(minutes=60)
SYSTEMIC_KEY = "systemic"
LISTED_JOBS = 10


def _episodes(limit: int | None = None) -> Query:
    """Jobs whose current stall episode began within the window."""
    return Query(ALERT_STATE, (Where("episode_at", ">=", lambda now, cfg: now - SYSTEMIC_WINDOW),), limit=limit)


def plan_and_write_systemic(store: SweepStore, now: dt.datetime,
                            cfg: Settings) -> tuple[str, alerts.SlackMessage] | None:
    """Records a systemic alert when one is due; returns (stall event id, message) to post, else None."""
    if cfg.systemic_threshold <= 0:
        return None
    n = store.count(_episodes(), now, cfg)
    if n < cfg.systemic_threshold:
        return None
    prior = store.get_many(ALERT_STATE, [SYSTEMIC_KEY]).get(SYSTEMIC_KEY)
    if not decide_systemic(n, cfg.systemic_threshold, prior.data if prior else None, now,
                           cfg.alert_cooldown_minutes):
        return None
    ids = [d.id for d in store.query(_episodes(LISTED_JOBS), now, cfg)]
    window_min = int(SYSTEMIC_WINDOW.total_seconds() // 60)
    message = alerts.build_systemic_message(n, cfg.systemic_threshold, ids, window_min)
    record = stall_event_record(SYSTEMIC_KEY, "systemic", Severity.CRITICAL.value, f"{n} jobs stalled within an hour",
                                now, FlagAction.SYSTEMIC.value, message, notify_state=NotifyState.PENDING,
                                notify_error=None)
    event_id = store.new_stall_event_id()
    store.write_together([
        AddStallEvent(event_id, record),
        MergeAlertState(SYSTEMIC_KEY, {"job_id": None, "updated_at": now, "last_alert_at": now,
                                       "last_severity": Severity.CRITICAL.value, "last_count": n}),
    ])
    log_event("systemic_stall", severity="CRITICAL", logger="upcfan.sweeper", stalled_jobs=n)
    return (event_id, message)
