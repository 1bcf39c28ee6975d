"""Which IAM permissions the functions' calls need, which roles grant them, and the check.

Three tables, kept as data:

- `ROLE_PERMISSIONS`: role -> permissions, for the roles this project grants. Source: Google
  Cloud's IAM reference, "IAM roles and permissions" pages for Cloud Tasks, Cloud Storage,
  Firestore, Secret Manager, IAM, Cloud Run and Eventarc. Only the permissions that matter to
  the calls below are listed (each role has at least these; the reference lists a few more,
  e.g. `resourcemanager.projects.get`). Note `roles/cloudtasks.enqueuer` has
  `cloudtasks.tasks.create` and `cloudtasks.tasks.fullView` only: no `tasks.get`, no `queues.get`.
- `METHOD_PERMISSIONS`: API method -> permissions it needs on its resource. Sources: Cloud Tasks
  "Access control reference" (the method table: GetQueue needs `cloudtasks.queues.get`, GetTask
  `cloudtasks.tasks.get`, CreateTask `cloudtasks.tasks.create`), the `GetTaskRequest.response_view`
  reference (FULL needs `cloudtasks.tasks.fullView`), Cloud Tasks "Create HTTP target tasks"
  (an OIDC token needs `iam.serviceAccounts.actAs` on its service account), Cloud Storage
  "IAM permissions for JSON methods" (objects.get, for metadata and media), Firestore "IAM"
  (reads `datastore.entities.get/list`, writes `create/update/delete`, transactions
  `datastore.databases.get`), Secret Manager (AccessSecretVersion needs
  `secretmanager.versions.access`; Cloud Run makes that call as the function's account).
- `FUNCTION_CALLS`: what each function's code calls, on which target, and where in the code.

`gaps(desired)` lists every call not covered by a role the model (`infra.model.GRANTS`) grants
that function's service account on the call's resource or on the project.
"""

from __future__ import annotations

from dataclasses import dataclass

from infra import model

ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "roles/cloudtasks.enqueuer": frozenset({"cloudtasks.tasks.create", "cloudtasks.tasks.fullView"}),
    "roles/cloudtasks.viewer": frozenset({
        "cloudtasks.locations.get", "cloudtasks.locations.list", "cloudtasks.queues.get",
        "cloudtasks.queues.list", "cloudtasks.tasks.get", "cloudtasks.tasks.list"}),
    "roles/storage.objectViewer": frozenset({"storage.objects.get", "storage.objects.list"}),
    # Creates objects (resumable uploads included), never overwrites or deletes one.
    "roles/storage.objectCreator": frozenset({"storage.objects.create", "storage.multipartUploads.create",
                                              "storage.multipartUploads.abort", "storage.multipartUploads.listParts"}),
    "roles/datastore.user": frozenset({
        "datastore.databases.get", "datastore.entities.get", "datastore.entities.list",
        "datastore.entities.create", "datastore.entities.update", "datastore.entities.delete"}),
    "roles/secretmanager.secretAccessor": frozenset({"secretmanager.versions.access"}),
    "roles/iam.serviceAccountUser": frozenset({"iam.serviceAccounts.actAs", "iam.serviceAccounts.get",
                                               "iam.serviceAccounts.list"}),
    "roles/run.invoker": frozenset({"run.routes.invoke"}),
    "roles/eventarc.eventReceiver": frozenset({"eventarc.events.receiveEvent"}),
}

METHOD_PERMISSIONS: dict[str, frozenset[str]] = {
    "cloudtasks.CreateTask": frozenset({"cloudtasks.tasks.create"}),
    "cloudtasks.GetTask(FULL)": frozenset({"cloudtasks.tasks.get", "cloudtasks.tasks.fullView"}),
    "cloudtasks.GetQueue": frozenset({"cloudtasks.queues.get"}),
    "iam.actAs(oidc_token)": frozenset({"iam.serviceAccounts.actAs"}),
    "storage.objects.get": frozenset({"storage.objects.get"}),
    "firestore.read": frozenset({"datastore.entities.get", "datastore.entities.list"}),
    "firestore.write": frozenset({"datastore.entities.create", "datastore.entities.update",
                                  "datastore.entities.delete"}),
    "firestore.transaction": frozenset({"datastore.databases.get"}),
    "secretmanager.AccessSecretVersion": frozenset({"secretmanager.versions.access"}),
    # The admin calls the local stack, tests, bench and scripts make (as the local operator), so that
    # the emulators classify every call. Sources: Cloud Tasks "Access control reference" (one
    # permission per method, named after it: CreateQueue needs `cloudtasks.queues.create`, PauseQueue
    # `cloudtasks.queues.pause`, ListTasks `cloudtasks.tasks.list`, RunTask `cloudtasks.tasks.run`, a
    # FULL response view adds `cloudtasks.tasks.fullView`); Cloud Storage "IAM permissions for JSON
    # methods" (objects.insert/compose/rewrite need `storage.objects.create`, objects.patch/update
    # `storage.objects.update`, buckets.insert `storage.buckets.create`, notifications.insert
    # `storage.buckets.update`).
    "cloudtasks.GetTask": frozenset({"cloudtasks.tasks.get"}),
    "cloudtasks.CreateTask(FULL)": frozenset({"cloudtasks.tasks.create", "cloudtasks.tasks.fullView"}),
    "cloudtasks.ListTasks": frozenset({"cloudtasks.tasks.list"}),
    "cloudtasks.ListTasks(FULL)": frozenset({"cloudtasks.tasks.list", "cloudtasks.tasks.fullView"}),
    "cloudtasks.DeleteTask": frozenset({"cloudtasks.tasks.delete"}),
    "cloudtasks.RunTask": frozenset({"cloudtasks.tasks.run"}),
    "cloudtasks.RunTask(FULL)": frozenset({"cloudtasks.tasks.run", "cloudtasks.tasks.fullView"}),
    "cloudtasks.CreateQueue": frozenset({"cloudtasks.queues.create"}),
    "cloudtasks.ListQueues": frozenset({"cloudtasks.queues.list"}),
    "cloudtasks.UpdateQueue": frozenset({"cloudtasks.queues.update"}),
    "cloudtasks.DeleteQueue": frozenset({"cloudtasks.queues.delete"}),
    "cloudtasks.PauseQueue": frozenset({"cloudtasks.queues.pause"}),
    "cloudtasks.ResumeQueue": frozenset({"cloudtasks.queues.resume"}),
    "cloudtasks.PurgeQueue": frozenset({"cloudtasks.queues.purge"}),
    "cloudtasks.GetLocation": frozenset({"cloudtasks.locations.get"}),
    "cloudtasks.ListLocations": frozenset({"cloudtasks.locations.list"}),
    "storage.objects.list": frozenset({"storage.objects.list"}),
    "storage.objects.create": frozenset({"storage.objects.create"}),
    "storage.objects.update": frozenset({"storage.objects.update"}),
    "storage.objects.delete": frozenset({"storage.objects.delete"}),
    "storage.buckets.create": frozenset({"storage.buckets.create"}),
    "storage.buckets.get": frozenset({"storage.buckets.get"}),
    "storage.buckets.list": frozenset({"storage.buckets.list"}),
    "storage.buckets.update": frozenset({"storage.buckets.update"}),
    "storage.buckets.delete": frozenset({"storage.buckets.delete"}),
}


@dataclass(frozen=True)
class Call:
    method: str  # key of METHOD_PERMISSIONS
    target: str  # as infra.model.Grant.target
    where: str  # the code that makes the call


_FIRESTORE = tuple(Call(m, "project", "shared/store/firestore.py")
                   for m in ("firestore.read", "firestore.write", "firestore.transaction"))
_ACT_AS = Call("iam.actAs(oidc_token)", "sa:tasks_invoker", "shared/tasks.py::_build_task (oidc_token)")
# The job-finished note goes to Slack from whichever function sees the job finish.
_SLACK = Call("secretmanager.AccessSecretVersion", f"secret:{model.SLACK_SECRET}",
              "shared/progress.py::_notify_finished (UPCFAN_SLACK_WEBHOOK_URL)")

FUNCTION_CALLS: dict[str, tuple[Call, ...]] = {
    "ingest": (
        *_FIRESTORE,
        Call("storage.objects.get", "bucket", "shared/gcs.py::GcsObject.stat and read"),
        Call("cloudtasks.CreateTask", "control_queue", "shared/ingest.py::submit_job (plan task) and "
                                                       "_plan_and_enqueue (chunk tasks)"),
        Call("cloudtasks.CreateTask", "item_queues", "shared/ingest.py::process_chunk (item tasks)"),
        Call("storage.objects.create", "bucket", "shared/results.py::write_results (results/{job_id}.csv, "
                                                 "resumable upload, only if absent)"),
        Call("storage.objects.get", "bucket", "shared/results.py::write_results (exists, and re-reading an "
                                              "object an earlier attempt wrote)"),
        Call("cloudtasks.CreateTask", "control_queue", "shared/results.py::request_results (when a job completes)"),
        Call("cloudtasks.CreateTask", "control_queue", "shared/progress.py::check_job_progress (at fan-out done: "
                                                       "asks again when another check is counting)"),
        _ACT_AS,
        _SLACK,
    ),
    "worker": (
        *_FIRESTORE,
        Call("cloudtasks.CreateTask", "control_queue", "shared/worker/progress_requests.py::request_progress_check"),
        Call("cloudtasks.CreateTask", "control_queue", "shared/results.py::request_results (when a job completes)"),
        _ACT_AS,
        Call("secretmanager.AccessSecretVersion", f"secret:{model.MARKETPLACE_SECRET}",
             "shared/handlers/marketplace_draft.py (UPCFAN_MARKETPLACE_API_KEY)"),
        _SLACK,
    ),
    "sweeper": (
        *_FIRESTORE,
        Call("secretmanager.AccessSecretVersion", f"secret:{model.SLACK_SECRET}", "shared/alerts.py (stall alerts)"),
    ),
    "api": (
        *_FIRESTORE,
        Call("storage.objects.get", "bucket", "shared/ingest.py::submit_job (POST /api/batch/process stats the file)"),
        Call("cloudtasks.CreateTask", "control_queue", "shared/ingest.py::submit_job (plan task)"),
        Call("cloudtasks.CreateTask", "item_queues", "shared/operations.py::_create_item_tasks (retry rounds)"),
        Call("cloudtasks.GetQueue", "item_queue:0", "shared/operations.py::health (/health)"),
        Call("cloudtasks.GetQueue", "small_item_queue", "shared/operations.py::health (/health, the small-jobs lane)"),
        Call("cloudtasks.GetTask", "item_queues", "shared/tasks.py::task_exists via "
                                                  "shared/operations.py::redrive_job (re-drive)"),
        Call("cloudtasks.CreateTask", "item_queues", "shared/operations.py::_create_redrive_tasks (re-drive)"),
        Call("cloudtasks.CreateTask", "control_queue", "shared/progress.py::check_job_progress (after a retry "
                                                       "round: asks again when another check is counting)"),
        _ACT_AS,
        _SLACK,
    ),
}

# Calls a library makes on its own that the model deliberately does not grant, and that the library
# tolerates being refused (as it is in Google Cloud): `python -m infra audit` lists their denials
# apart instead of as findings.
TOLERATED_DENIALS: dict[str, str] = {
    "storage.buckets.get": "google-cloud-storage (3.x, google/cloud/storage/_bucket_metadata_cache.py) fetches "
                           "the bucket's metadata in the background for its telemetry and, on 403, caches a "
                           "fallback; roles/storage.objectViewer has no storage.buckets.get, on purpose",
}


def granted_roles(d: model.Desired, account: str, resource: str, grants=model.GRANTS) -> set[str]:
    """Roles `account` holds on `resource`, directly or on the project (IAM inheritance)."""
    project = f"projects/{d.project}"
    return {g.role for g in grants if g.account == account
            for r in d.target_resources(g.target) if r in (resource, project)}


def granted_permissions(roles: set[str]) -> set[str]:
    return set().union(*(ROLE_PERMISSIONS[r] for r in roles)) if roles else set()


def gaps(d: model.Desired, grants=model.GRANTS, calls=None) -> list[str]:
    """Every call a function makes that its service account's roles do not cover, as sentences."""
    out = []
    for fn, fn_calls in (calls or FUNCTION_CALLS).items():
        for call in fn_calls:
            resources = d.target_resources(call.target)
            if not resources:
                out.append(f"{fn}: {call.method} on {call.target}: the model names no such resource "
                           f"(e.g. no bucket configured)")
            for resource in resources:
                roles = granted_roles(d, fn, resource, grants)
                missing = METHOD_PERMISSIONS[call.method] - granted_permissions(roles)
                if missing:
                    out.append(f"{fn} ({d.sa_email(fn)}): {call.method} on {resource} needs {sorted(missing)}; "
                               f"granted there: {sorted(roles) or 'nothing'} ({call.where})")
    return out


def calls_needing(account: str, role: str) -> list[Call]:
    """The calls of `account`'s function that a grant of `role` serves (for the docs table)."""
    return [c for c in FUNCTION_CALLS.get(account, ()) if METHOD_PERMISSIONS[c.method] & ROLE_PERMISSIONS[role]]


# ---- docs/operations.md: one table per service account (a unit test keeps the doc in step) ----

_TARGET_WORDS = {"project": "project", "item_queues": "every item queue (bulk shards and small-jobs lane)",
                 "item_queue": "first item queue only", "small_item_queue": "small-jobs item queue",
                 "control_queue": "control queue", "bucket": "watched bucket", "secret": "secret `{}`",
                 "sa": "service account `{}`", "run": "service `{}`"}


def _on(target: str) -> str:
    kind, _, arg = target.partition(":")
    if kind == "sa":
        arg = model.SA_IDS[arg]
    return _TARGET_WORDS[kind].format(arg)


def _serves(grant_target: str, call_target: str) -> bool:
    return grant_target in (call_target, "project") or (
        grant_target == "item_queues" and call_target in ("item_queue:0", "small_item_queue"))


def grant_calls(grant: model.Grant) -> list[Call]:
    """The calls of the grantee's function that this grant serves."""
    return [c for c in calls_needing(grant.account, grant.role) if _serves(grant.target, c.target)]


def docs_tables(grants=model.GRANTS) -> str:
    out = []
    for account, sa_id in model.SA_IDS.items():
        mine = [g for g in grants if g.account == account]
        if not mine:
            continue
        out += [f"#### `{sa_id}`", "", "| role | on | why | calls that need it |", "|---|---|---|---|"]
        for g in mine:
            calls = "; ".join(f"{c.method} ({c.where})" for c in grant_calls(g)) or "none: Google calls the service as this account"
            out.append(f"| `{g.role}` | {_on(g.target)} | {g.why} | {calls} |")
        out.append("")
    return "\n".join(out)
