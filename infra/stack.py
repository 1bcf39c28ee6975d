"""All resources of one deployment, in dependency order, built from a `Desired`."""

from __future__ import annotations

from pathlib import Path

from infra.clients import ServiceAccountSpec
from infra.model import (EVENTARC_TRIGGER, FINALIZE_EVENT, MARKETPLACE_SECRET, SA_IDS, SCHEDULER_JOB,
                         SLACK_SECRET, Desired)
from infra.resources.base import Resource
from infra.resources.eventarc import FinalizeTrigger
from infra.resources.firestore import load_index_file
from infra.resources.iam import IamBindings
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
    out.append(SecretContainer(d.project, SLACK_SECRET, d.labels))
    out.append(SecretContainer(d.project, MARKETPLACE_SECRET, d.labels))

    # 4. least-privilege IAM
    out.append(IamBindings(f"projects/{d.project}", "projects", [
        ("roles/datastore.user", _sa(d, "ingest")),
        ("roles/datastore.user", _sa(d, "worker")),
        ("roles/datastore.user", _sa(d, "sweeper")),
        ("roles/datastore.user", _sa(d, "api")),
        # Required for an Eventarc trigger's identity to receive events.
        ("roles/eventarc.eventReceiver", _sa(d, "eventarc_invoker")),
    ]))
    # Enqueue rights per queue, not project-wide: ingest fans out to every queue, the worker
    # only asks for progress checks (control queue), the API creates retry rounds (items) and
    # progress checks (control).
    item_qs, control_q = qs[:-1], qs[-1]
    for q in item_qs:
        out.append(IamBindings(q.name, "tasks", [
            ("roles/cloudtasks.enqueuer", _sa(d, "ingest")),
            ("roles/cloudtasks.enqueuer", _sa(d, "api")),
        ]))
    out.append(IamBindings(control_q.name, "tasks", [
        ("roles/cloudtasks.enqueuer", _sa(d, "ingest")),
        ("roles/cloudtasks.enqueuer", _sa(d, "worker")),
        ("roles/cloudtasks.enqueuer", _sa(d, "api")),
    ]))
    if d.bucket:
        out.append(IamBindings(f"projects/_/buckets/{d.bucket}", "storage_iam", [
            ("roles/storage.objectViewer", _sa(d, "ingest")),
        ], missing_hint=f"bucket {d.bucket} does not exist"))
    out.append(IamBindings(d.secret_path(SLACK_SECRET), "secrets", [
        ("roles/secretmanager.secretAccessor", _sa(d, "sweeper")),
    ]))
    out.append(IamBindings(d.secret_path(MARKETPLACE_SECRET), "secrets", [
        ("roles/secretmanager.secretAccessor", _sa(d, "worker")),
    ]))
    # Creating a task with an OIDC token "acts as" the tasks-invoker account.
    out.append(IamBindings(f"projects/{d.project}/serviceAccounts/{d.sa_email('tasks_invoker')}", "iam", [
        ("roles/iam.serviceAccountUser", _sa(d, "ingest")),
        ("roles/iam.serviceAccountUser", _sa(d, "worker")),
        ("roles/iam.serviceAccountUser", _sa(d, "api")),
    ]))

    # 5. Firestore indexes and TTL policies
    if index_file is not None and Path(index_file).exists():
        indexes, ttls = load_index_file(Path(index_file), d.project)
        out.extend(indexes)
        out.extend(ttls)

    # 6. after the functions exist: invokers on their one target service, scheduler, eventarc
    def invoker(fn: str, roles: list[str]) -> IamBindings:
        return IamBindings(d.run_service_path(fn), "run", [("roles/run.invoker", _sa(d, r)) for r in roles],
                           after_deploy=True, missing_hint=f"function {fn} not deployed yet (run scripts/deploy)")

    out.append(invoker("worker", ["tasks_invoker"]))
    out.append(invoker("ingest", ["tasks_invoker", "eventarc_invoker"]))
    out.append(invoker("sweeper", ["scheduler_invoker"]))
    job = SweeperJob(d.location_path, SCHEDULER_JOB, d.function_url("sweeper"), d.sa_email("scheduler_invoker"),
                     d.sweep_schedule)
    job.after_deploy = True
    out.append(job)
    if d.bucket:
        out.append(FinalizeTrigger(d.location_path, EVENTARC_TRIGGER, d.bucket, FINALIZE_EVENT, "ingest",
                                   d.region, d.sa_email("eventarc_invoker"), d.labels))
    return out
