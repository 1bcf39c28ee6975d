"""The sweeper: finds stalled jobs and items with indexed queries, flags them and alerts — never "fixes".

Guarantee 4 ("stalls are seen, not fixed"): the only writes the sweeper makes are the store's
`write_*` methods (`shared/sweeper/store.py`). They touch `jobs/{id}.stall` (one field, with
`update()` and an update-time precondition, so a job that moved since we read it is left
alone), `jobs/{id}/events`, `stall_events` and `alert_state`. Nothing here writes an item,
creates or deletes a task, or changes a job's status, counts or totals
(tests/unit/test_sweeper_rules.py checks this on the source).

A sweep's flags, recoveries and their records are committed together in atomic WriteBatches
(≤ MAX_BATCH_OPS writes, ≤ COMMIT_PARALLEL in flight); one job's writes never straddle two
batches. A batch whose precondition fails is halved until the job(s) that moved stand alone;
those are skipped (`skipped_moved`) and looked at again by the next sweep.

Modules: `engine` (the sweep: scan, flag, systemic, deliver), `rules/` (one module per rule and
the registry), `decisions` (pure alert decisions and the cooldown-on-the-flag design), `plan`
(each job's writes), `store` (persistence), `outbox` (stall_events and Slack posts), `systemic`,
`report`, `findings`.

Queries, each one costing reads in proportion to *stalled* things, not to all jobs (a rule's
row is in its module's docstring; its index is `Rule.index`, kept in firestore.indexes.json):

| finding | query | index |
|---|---|---|
| `no_progress`, `queued_stall` (rules/running.py) | jobs `status == running AND last_progress_at < now - min(stall, queued_stall)`; classified in memory | jobs (status, last_progress_at) |
| `ingesting_stall` (rules/ingesting.py) | jobs `status == ingesting AND created_at < now - ingesting_stall` | jobs (status, created_at) |
| `progress_check_missed` (rules/progress_missed.py) | jobs `status == running AND progress_check_missed_at < now - 2 min` | jobs (status, progress_check_missed_at) |
| `lease_overrun` (rules/lease_overrun.py) | group `items` `status == processing AND lease_shard in [0..15] AND lease_expires_at < now - overrun` | items CG (status, lease_shard, lease_expires_at) |
| flagged jobs (recovery check) | jobs `stall.flagged_at > epoch` | automatic single-field index |
| per-job cooldown | none: read from the finding's own `stall.last_alert_at/last_severity` | — |
| systemic cooldown | get `alert_state/systemic`, only when the count reaches the threshold | — |
| jobs that stalled in the last hour (systemic) | count(alert_state `episode_at >= now - 1h`) | automatic single-field index |
| un-notified alerts to retry | stall_events `notify_state in (pending, failed) AND detected_at >= now - 24h` | stall_events (notify_state, detected_at) |

Documents read per sweep: the stalled jobs (stall queries) + the flagged jobs + ≤ 1 per empty query
+ two count aggregations per alerted job whose counts snapshot does not settle "never claimed".
"""

from shared.sweeper.engine import run_sweep
from shared.sweeper.findings import Finding, Severity
from shared.sweeper.report import ReadMeter, SweepReport

__all__ = ["Finding", "ReadMeter", "Severity", "SweepReport", "run_sweep"]
