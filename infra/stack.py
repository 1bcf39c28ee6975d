"""All resources of one deployment, in dependency order, built from a `Desired`."""

from __future__ import annotations

from pathlib import Path

from infra.clients import ServiceAccountSpec
from infra.model import (EVENTARC_TRIGGER, FINALIZE_EVENT, GRANTS, SA_IDS, SCHEDULER_JOB, SECRETS,
                         SWEEP_METRIC, WATCHDOG_POLICY, Desired)
from infra.resources.base import Resource
from infra.resources.eventarc import FinalizeTrigger
from infra.resources.firestore import load_index_file
from infra.resources.iam import IamBindings
from infra.resources.monitoring import SweepDoneMetric, SweeperAbsencePolicy, schedule_period_s
from infra.resources.queues import TaskQueue
from infra.resources.scheduler import SweeperJob
from infra.resources.secrets import SecretContainer
from infra.resources.service_accounts import ServiceAccount

REPO_ROOT = Path(__file__).resolve().parent.parent
INDEX_FILE = REPO_ROOT / "firestore.indexes.json"

SA_DESCRIPTIONS = {
    "ingest": "upcfan ingest function (GCS finalize, /fanout chunk tasks)",
    "worker": "upcfan worker function (item tasks, /progress checks)",
    "sweeper": "upcfan sweeper function (stall flags, Slack alerts)",
    "api": "upcfan operator API function",
    "tasks_invoker": "OIDC identity of Cloud Tasks dispatches to worker and ingest",
    "scheduler_invoker": "OIDC identity of the Cloud Scheduler sweeper job",
    "eventarc_invoker": "Identity of the Eventarc GCS finalize trigger to ingest",
}


def queues(d: Desired) -> list[TaskQueue]:
    return [TaskQueue(d.location_path, spec) for spec in d.queue_specs()]


def _sa(d: Desired, role: str) -> str:
    return f"serviceAccount:{d.sa_email(role)}"


def _holder(d: Desired, target: str) -> tuple[str, dict]:
    """Client name and IamBindings options for the resources a grant target names."""
    kind, _, arg = target.partition(":")
    if kind == "project":
        return "projects", {}
    if kind in ("item_queues", "item_queue", "small_item_queue", "control_queue"):
        return "tasks", {}
    if kind == "bucket":
        return "storage_iam", {"missing_hint": f"bucket {d.bucket} does not exist"}
    if kind == "secret":
        return "secrets", {}
    if kind == "sa":
        return "iam", {}
    if kind == "run":
        return "run", {"after_deploy": True, "missing_hint": f"function {arg} not deployed yet (run scripts/deploy)"}
    raise ValueError(f"unknown grant target {target!r}")


def iam_bindings(d: Desired, grants=GRANTS) -> tuple[list[IamBindings], list[IamBindings]]:
    """One IamBindings per policy holder, in first-grant order: (before deploy, after deploy)."""
    holders: dict[str, tuple[str, dict, list]] = {}
    for g in grants:
        client_name, opts = _holder(d, g.target)
        for resource in d.target_resources(g.target):
            holders.setdefault(resource, (client_name, opts, []))[2].append((g.role, _sa(d, g.account)))
    out = [IamBindings(resource, client_name, bindings, **opts)
           for resource, (client_name, opts, bindings) in holders.items()]
    return [b for b in out if not b.after_deploy], [b for b in out if b.after_deploy]


def build(d: Desired, index_file: Path | None = INDEX_FILE) -> list[Resource]:
    out: list[Resource] = []

    # 1. identities
    for role, account_id in SA_IDS.items():
        out.append(ServiceAccount(ServiceAccountSpec(d.project, account_id, f"upcfan {role.replace('_', ' ')}",
                                                     SA_DESCRIPTIONS[role])))
    # 2. queues
    qs = queues(d)
    out.extend(qs)
    # 3. secret containers (values are added by an operator)
    out.extend(SecretContainer(d.project, secret, d.labels) for secret in SECRETS)

    # 4. least-privilege IAM (model.GRANTS: each grant says which calls need it). Secret
    # accessor grants come before the functions: Cloud Run refuses a revision whose service
    # account cannot read a secret it mounts.
    before, after = iam_bindings(d)
    out.extend(before)

    # 5. Firestore indexes and field overrides (exemptions of unqueried item fields, TTL policies)
    if index_file is not None and Path(index_file).exists():
        indexes, overrides = load_index_file(Path(index_file), d.project)
        out.extend(indexes)
        out.extend(overrides)

    # 6. who watches the watcher: the sweep counter and the alert on its absence (neither needs the
    # functions; the policy only alerts once sweeps were expected for three periods)
    metric = SweepDoneMetric(d.project, SWEEP_METRIC)
    out.append(metric)
    out.append(SweeperAbsencePolicy(d.project, WATCHDOG_POLICY, metric.metric_type, schedule_period_s(d.sweep_schedule),
                                    d.alert_channels, d.labels))

    # 7. after the functions exist: invokers on their one target service, scheduler, eventarc
    out.extend(after)
    job = SweeperJob(d.location_path, SCHEDULER_JOB, d.function_url("sweeper"), d.sa_email("scheduler_invoker"),
                     d.sweep_schedule)
    job.after_deploy = True
    out.append(job)
    if d.bucket:
        out.append(FinalizeTrigger(d.location_path, EVENTARC_TRIGGER, d.bucket, FINALIZE_EVENT, "ingest",
                                   d.region, d.sa_email("eventarc_invoker"), d.labels))
    return out
