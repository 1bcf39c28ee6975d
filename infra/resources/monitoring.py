"""Who watches the watcher: a log-based counter of the sweeper's `sweep_done` lines (Cloud Logging) and
an alert policy that fires when that counter has no data for three schedule periods (Cloud Monitoring),
sent to the notification channels the deploy names (`--alert-channel`).

Why a log-based metric and an absence condition: a sweeper that is not scheduled, paused, failing to
start or refused by IAM writes nothing at all, so the only signal is the missing `sweep_done` line.
"MetricAbsence: ... in violation when a time series for the specified metric ... does not include any
data in the specified duration" (cloud.google.com/monitoring/api/ref_v3/rest/v3/projects.alertPolicies,
MetricAbsence); its duration must be a whole number of minutes, at least 120 s.
"""

from __future__ import annotations

from google.api_core import exceptions as gexc

from infra.resources.base import CREATE, Change, Resource

# What each `sweep_done` line is, as shared/log.py writes it: Cloud Run parses a JSON stdout line into
# `jsonPayload` (its `severity` into the entry's severity). The sweeper runs as the Cloud Run service
# `sweeper` (a gen2 function), so its entries have resource.type "cloud_run_revision".
SWEEP_DONE_FILTER = ('resource.type="cloud_run_revision" AND resource.labels.service_name="sweeper" '
                     'AND jsonPayload.event="sweep_done"')
PERIODS_WITHOUT_SWEEP = 3
MAX_ABSENCE_S = 23 * 3600 + 30 * 60  # MetricAbsence.duration: at most 23 h 30 min
WATCHDOG_DOC = ("The upcfan sweeper has completed no sweep for {periods} schedule periods ({minutes} min). "
                "Nothing flags stalled jobs while it is down. Check: `gcloud scheduler jobs describe "
                "upcfan-sweeper --location REGION` (state PAUSED? last attempt status?), the sweeper's "
                "logs (jsonPayload.event=\"sweep_failed\"), and run one now with `gcloud scheduler jobs run "
                "upcfan-sweeper --location REGION` or `upcfan sweep`.")


class SweepDoneMetric(Resource):
    """A DELTA INT64 counter metric: one point per `sweep_done` log entry."""

    kind = "logging.metric"
    client_name = "logging_metrics"

    def __init__(self, project: str, metric_id: str, log_filter: str = SWEEP_DONE_FILTER):
        self.project = project
        self.metric_id = metric_id
        self.log_filter = log_filter

    @property
    def name(self) -> str:
        return f"projects/{self.project}/metrics/{self.metric_id}"

    @property
    def metric_type(self) -> str:
        return f"logging.googleapis.com/user/{self.metric_id}"

    def desired(self) -> dict:
        return {"description": "upcfan: sweeps completed (the sweeper's sweep_done log line)",
                "filter": self.log_filter}

    def read(self, client) -> dict | None:
        from google.cloud import logging_v2

        try:
            m = client.get_log_metric(request=logging_v2.types.GetLogMetricRequest(metric_name=self.name))
        except gexc.NotFound:
            return None
        return {"description": m.description, "filter": m.filter}

    def to_proto(self):
        from google.api import metric_pb2
        from google.cloud import logging_v2

        d = self.desired()
        # A counter: metric_kind DELTA, value_type INT64 (the only kind of a counter log-based metric).
        return logging_v2.types.LogMetric(
            name=self.metric_id, description=d["description"], filter=d["filter"],
            metric_descriptor=metric_pb2.MetricDescriptor(metric_kind=metric_pb2.MetricDescriptor.MetricKind.DELTA,
                                                          value_type=metric_pb2.MetricDescriptor.ValueType.INT64,
                                                          unit="1"))

    def apply(self, client, change: Change) -> None:
        from google.cloud import logging_v2

        if change.action == CREATE:
            client.create_log_metric(request=logging_v2.types.CreateLogMetricRequest(
                parent=f"projects/{self.project}", metric=self.to_proto()))
            return
        client.update_log_metric(request=logging_v2.types.UpdateLogMetricRequest(
            metric_name=self.name, metric=self.to_proto()))


class SweeperAbsencePolicy(Resource):
    """An alert policy (found by its display name: Monitoring assigns policy ids) with one
    MetricAbsence condition on the sweep counter, summed over every revision's series."""

    kind = "monitoring.alertPolicy"
    client_name = "alert_policies"
    after_deploy = False

    def __init__(self, project: str, display_name: str, metric_type: str, period_s: int,
                 channels: tuple[str, ...] = (), labels: dict | None = None):
        if period_s < 60 or period_s % 60:
            raise ValueError(f"sweep period {period_s}s: the watchdog needs a whole number of minutes")
        if PERIODS_WITHOUT_SWEEP * period_s > MAX_ABSENCE_S:
            raise ValueError(f"sweep period {period_s}s: {PERIODS_WITHOUT_SWEEP} periods exceed the longest absence "
                             f"window Cloud Monitoring allows ({MAX_ABSENCE_S // 60} min)")
        self.project = project
        self.display_name = display_name
        self.metric_type = metric_type
        self.period_s = period_s
        self.channels = tuple(channels)
        self.labels = dict(labels or {})
        self.policy_name = ""  # projects/P/alertPolicies/ID once read

    @property
    def name(self) -> str:
        return self.policy_name or f"projects/{self.project}/alertPolicies/[{self.display_name}]"

    @property
    def absent_for_s(self) -> int:
        return max(120, PERIODS_WITHOUT_SWEEP * self.period_s)

    def desired(self) -> dict:
        return {
            "display_name": self.display_name,
            "combiner": "OR",
            "enabled": True,
            "notification_channels": sorted(self.channels),
            "user_labels": dict(sorted(self.labels.items())),
            "documentation": WATCHDOG_DOC.format(periods=PERIODS_WITHOUT_SWEEP, minutes=self.absent_for_s // 60),
            "condition": {
                "display_name": f"no sweep_done for {PERIODS_WITHOUT_SWEEP} schedule periods",
                # Summed over every series: a new revision starts a new series, and an absence condition
                # per series would fire for the old revision after every deploy.
                "filter": f'metric.type="{self.metric_type}" AND resource.type="cloud_run_revision"',
                "duration_s": self.absent_for_s,
                "alignment_period_s": self.period_s,
                "aligner": "ALIGN_SUM",
                "reducer": "REDUCE_SUM",
            },
        }

    def _find(self, client):
        from google.cloud import monitoring_v3

        policies = client.list_alert_policies(request=monitoring_v3.ListAlertPoliciesRequest(
            name=f"projects/{self.project}", filter=f'display_name="{self.display_name}"'))
        found = [p for p in policies if p.display_name == self.display_name]
        if len(found) > 1:
            raise RuntimeError(f"{len(found)} alert policies named {self.display_name!r}: delete all but one")
        return found[0] if found else None

    def read(self, client) -> dict | None:
        from google.cloud import monitoring_v3

        p = self._find(client)
        if p is None:
            return None
        self.policy_name = p.name
        cond = p.conditions[0] if p.conditions else None
        absent = cond.condition_absent if cond else None
        agg = absent.aggregations[0] if absent and absent.aggregations else None
        return {
            "display_name": p.display_name,
            "combiner": monitoring_v3.AlertPolicy.ConditionCombinerType(p.combiner).name,
            "enabled": bool(p.enabled),
            "notification_channels": sorted(p.notification_channels),
            "user_labels": dict(sorted(p.user_labels.items())),
            "documentation": p.documentation.content,
            "condition": {
                "display_name": cond.display_name if cond else "",
                "filter": absent.filter if absent else "",
                "duration_s": int(absent.duration.total_seconds()) if absent and absent.duration else 0,
                "alignment_period_s": int(agg.alignment_period.total_seconds()) if agg and agg.alignment_period else 0,
                "aligner": monitoring_v3.Aggregation.Aligner(agg.per_series_aligner).name if agg else "",
                "reducer": monitoring_v3.Aggregation.Reducer(agg.cross_series_reducer).name if agg else "",
            },
        }

    def to_proto(self):
        from google.cloud import monitoring_v3
        from google.protobuf import duration_pb2

        d = self.desired()
        c = d["condition"]
        return monitoring_v3.AlertPolicy(
            name=self.policy_name,
            display_name=d["display_name"],
            combiner=monitoring_v3.AlertPolicy.ConditionCombinerType.OR,
            enabled=True,
            notification_channels=d["notification_channels"],
            user_labels=d["user_labels"],
            documentation=monitoring_v3.AlertPolicy.Documentation(content=d["documentation"], mime_type="text/markdown"),
            conditions=[monitoring_v3.AlertPolicy.Condition(
                display_name=c["display_name"],
                condition_absent=monitoring_v3.AlertPolicy.Condition.MetricAbsence(
                    filter=c["filter"],
                    duration=duration_pb2.Duration(seconds=c["duration_s"]),
                    aggregations=[monitoring_v3.Aggregation(
                        alignment_period=duration_pb2.Duration(seconds=c["alignment_period_s"]),
                        per_series_aligner=monitoring_v3.Aggregation.Aligner.ALIGN_SUM,
                        cross_series_reducer=monitoring_v3.Aggregation.Reducer.REDUCE_SUM)],
                ))],
        )

    def apply(self, client, change: Change) -> None:
        from google.cloud import monitoring_v3
        from google.protobuf import field_mask_pb2

        if change.action == CREATE:
            client.create_alert_policy(request=monitoring_v3.CreateAlertPolicyRequest(
                name=f"projects/{self.project}", alert_policy=self.to_proto()))
            return
        # The one condition is replaced whole (its id is server-assigned; `conditions` replaces the list).
        top = {"condition": "conditions", "documentation": "documentation"}
        paths = sorted({top.get(p.split(".")[0], p.split(".")[0]) for p in change.fields})
        client.update_alert_policy(request=monitoring_v3.UpdateAlertPolicyRequest(
            alert_policy=self.to_proto(), update_mask=field_mask_pb2.FieldMask(paths=paths)))


def schedule_period_s(schedule: str) -> int:
    """The period of a sweep schedule the watchdog understands: `*/N * * * *` (every N minutes),
    `* * * * *`, or `M * * * *` / `M */H * * *` (hourly / every H hours)."""
    fields = schedule.split()
    if len(fields) != 5 or fields[2:] != ["*", "*", "*"]:
        raise ValueError(f"sweep schedule {schedule!r}: the watchdog needs '*/N * * * *', '* * * * *' or "
                         f"'M */H * * *' (a fixed period) to know what three periods are")
    minute, hour = fields[0], fields[1]
    if hour == "*":
        if minute == "*":
            return 60
        if minute.startswith("*/") and minute[2:].isdigit() and int(minute[2:]) > 0:
            return int(minute[2:]) * 60
        if minute.isdigit():
            return 3600
    elif minute.isdigit() and hour.startswith("*/") and hour[2:].isdigit() and int(hour[2:]) > 0:
        return int(hour[2:]) * 3600
    raise ValueError(f"sweep schedule {schedule!r}: no fixed period the watchdog understands "
                     f"('*/N * * * *', '* * * * *', 'M * * * *' or 'M */H * * *')")
