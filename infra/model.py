"""The desired production shape, built from `shared/config.py` plus command-line flags.

Nothing here talks to Google: it only names things (service accounts, URLs, secrets,
queues) so that resources, the deploy script and the docs agree on one spelling.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from infra.sharding import shard_queue_name
from shared.config import CONTROL_QUEUE, ITEM_QUEUE, SMALL_ITEM_QUEUE, SMALL_JOB_MAX_LINES, QueueSpec

FUNCTIONS = ("ingest", "worker", "sweeper", "api")

# Secret Manager secret ids (containers only; values are added by an operator).
SLACK_SECRET = "upcfan-slack-webhook"
MARKETPLACE_SECRET = "upcfan-marketplace-api-key"

# Service account ids (the part before @).
SA_IDS = {
    "ingest": "upcfan-ingest",
    "worker": "upcfan-worker",
    "sweeper": "upcfan-sweeper",
    "api": "upcfan-api",
    # OIDC identity Cloud Tasks uses to call worker (items, /progress) and ingest (/fanout).
    "tasks_invoker": "upcfan-tasks-invoker",
    # OIDC identity Cloud Scheduler uses to call the sweeper.
    "scheduler_invoker": "upcfan-scheduler-invoker",
    # Identity of the Eventarc trigger that delivers GCS finalize events to ingest.
    "eventarc_invoker": "upcfan-eventarc-invoker",
}

# Secrets each function mounts (`--set-secrets ENV=secret:latest`), and why. A function that sends
# job notes to Slack needs the webhook: the job-finished note is sent by whichever function sees
# the job finish (`shared/progress.py::check_job_progress`, called by the worker's /progress, by
# ingest when fan-out ends and by the API's operations), and the sweeper sends stall alerts.
SLACK_ENV = "UPCFAN_SLACK_WEBHOOK_URL"
MARKETPLACE_ENV = "UPCFAN_MARKETPLACE_API_KEY"
FUNCTION_SECRETS: dict[str, tuple[tuple[str, str], ...]] = {
    "ingest": ((SLACK_ENV, SLACK_SECRET),),
    "worker": ((MARKETPLACE_ENV, MARKETPLACE_SECRET), (SLACK_ENV, SLACK_SECRET)),
    "sweeper": ((SLACK_ENV, SLACK_SECRET),),
    "api": ((SLACK_ENV, SLACK_SECRET),),
}
SECRETS = (SLACK_SECRET, MARKETPLACE_SECRET)


@dataclass(frozen=True)
class Grant:
    """One IAM grant: `role` to the service account `account` (a key of SA_IDS) on `target`.

    Targets: "project", "item_queues" (every item queue: the bulk shards and the small-jobs lane),
    "item_queue:0" (the first bulk shard only), "small_item_queue" (the small-jobs lane),
    "control_queue", "bucket", "secret:<id>", "sa:<account>" (a service account as a resource),
    "run:<function>" (the Cloud Run service behind a function; exists only after deploy).
    """

    account: str
    role: str
    target: str
    why: str


def _secret_grants() -> list[Grant]:
    return [Grant(fn, "roles/secretmanager.secretAccessor", f"secret:{secret}",
                  f"Cloud Run reads {env} from this secret when an instance starts")
            for fn, pairs in FUNCTION_SECRETS.items() for env, secret in pairs]


# Least privilege: every grant names the calls that need it (infra/permissions.py checks that
# each call a function makes is covered, and docs/operations.md lists them per account).
GRANTS: tuple[Grant, ...] = (
    # Firestore has no finer grant than the project.
    *(Grant(fn, "roles/datastore.user", "project", "Firestore reads, writes and transactions")
      for fn in FUNCTIONS),
    Grant("eventarc_invoker", "roles/eventarc.eventReceiver", "project",
          "required by Eventarc for a trigger's identity to receive events"),
    # Enqueue rights per queue, not project-wide.
    Grant("ingest", "roles/cloudtasks.enqueuer", "item_queues", "CreateTask: one task per item (fan-out)"),
    Grant("api", "roles/cloudtasks.enqueuer", "item_queues", "CreateTask: retry rounds (retry-failed) and re-drive"),
    Grant("api", "roles/cloudtasks.viewer", "item_queues",
          "GetQueue: /health checks the first item queue and the small-jobs lane; GetTask: re-drive checks "
          "whether an open item's task still exists (in its job's lane, the item's shard)"),
    Grant("ingest", "roles/cloudtasks.enqueuer", "control_queue", "CreateTask: plan tasks (/plan), chunk tasks (/fanout)"),
    Grant("worker", "roles/cloudtasks.enqueuer", "control_queue", "CreateTask: progress checks (/progress)"),
    Grant("api", "roles/cloudtasks.enqueuer", "control_queue",
          "CreateTask: the plan task of a file submitted with POST /api/batch/process"),
    Grant("ingest", "roles/storage.objectViewer", "bucket", "read the dropped file (stat, plan, chunk ranges)"),
    Grant("ingest", "roles/storage.objectCreator", "bucket",
          "write a finished job's results manifest, results/{job_id}.csv (/results; create only, never overwrite)"),
    Grant("api", "roles/storage.objectViewer", "bucket",
          "POST /api/batch/process stats the file (a 404 names a missing one; ingest's plan task reads it)"),
    *_secret_grants(),
    # Creating a task with an OIDC token "acts as" the tasks-invoker account.
    *(Grant(fn, "roles/iam.serviceAccountUser", "sa:tasks_invoker",
            "CreateTask with an OIDC token of upcfan-tasks-invoker (iam.serviceAccounts.actAs)")
      for fn in ("ingest", "worker", "api")),
    # After deploy: each caller may invoke only its target service.
    Grant("tasks_invoker", "roles/run.invoker", "run:worker", "Cloud Tasks delivers item tasks and /progress"),
    Grant("tasks_invoker", "roles/run.invoker", "run:ingest", "Cloud Tasks delivers plan tasks (/plan), chunk tasks (/fanout) and results tasks (/results)"),
    Grant("eventarc_invoker", "roles/run.invoker", "run:ingest", "Eventarc delivers GCS finalize events"),
    Grant("scheduler_invoker", "roles/run.invoker", "run:sweeper", "Cloud Scheduler runs the sweep"),
)

SCHEDULER_JOB = "upcfan-sweeper"
# Who watches the watcher (infra/resources/monitoring.py): a counter of the sweeper's `sweep_done` log
# lines and an alert policy on its absence, sent to the deploy's notification channels.
SWEEP_METRIC = "upcfan-sweep-done"
WATCHDOG_POLICY = "upcfan sweeper stopped"
EVENTARC_TRIGGER = "upcfan-ingest-finalize"
FINALIZE_EVENT = "google.cloud.storage.object.v1.finalized"
LABELS = {"app": "upcfan", "managed-by": "upcfan-infra"}
DEFAULT_URL_TEMPLATE = "https://{region}-{project}.cloudfunctions.net/{function}"


@dataclass(frozen=True)
class Desired:
    project: str
    region: str
    bucket: str = ""
    item_queue_shards: int = 1
    item_queue: QueueSpec = ITEM_QUEUE
    # The small-jobs lane (shared/config.py SMALL_ITEM_QUEUE): one queue, never sharded.
    small_item_queue: QueueSpec = SMALL_ITEM_QUEUE
    # Jobs of at most this many lines run in the small-jobs lane (UPCFAN_SMALL_JOB_MAX_LINES; 0: none).
    small_job_max_lines: int = SMALL_JOB_MAX_LINES
    control_queue: QueueSpec = CONTROL_QUEUE
    sweep_schedule: str = "*/5 * * * *"
    url_template: str = DEFAULT_URL_TEMPLATE
    labels: dict = field(default_factory=lambda: dict(LABELS))
    # Per-function URLs that the template cannot express (the local stack: one port per function).
    service_urls: dict = field(default_factory=dict)
    # Buckets files may also be submitted from (over HTTP), unwatched; readable like `bucket`.
    submit_buckets: tuple = ()
    # Cloud Monitoring notification channels (projects/P/notificationChannels/ID) the sweeper watchdog
    # alerts; created once by an operator (docs/operations.md, "Who watches the watcher").
    alert_channels: tuple = ()

    # ---- names -------------------------------------------------------------------------
    def sa_email(self, role: str) -> str:
        return f"{SA_IDS[role]}@{self.project}.iam.gserviceaccount.com"

    def function_url(self, function: str) -> str:
        if function in self.service_urls:
            return self.service_urls[function]
        return self.url_template.format(region=self.region, project=self.project, function=function)

    @property
    def location_path(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    def queue_specs(self) -> list[QueueSpec]:
        """Item shards (`upcfan-items`, `upcfan-items-1`, ...), the small-jobs lane, then the control queue."""
        shards = [
            replace(self.item_queue, name=shard_queue_name(self.item_queue.name, i))
            for i in range(self.item_queue_shards)
        ]
        return shards + [self.small_item_queue, self.control_queue]

    def secret_path(self, secret_id: str) -> str:
        return f"projects/{self.project}/secrets/{secret_id}"

    def run_service_path(self, function: str) -> str:
        # A gen2 function runs as the Cloud Run service of the same name.
        return f"{self.location_path}/services/{function}"

    def sa_path(self, role: str) -> str:
        return f"projects/{self.project}/serviceAccounts/{self.sa_email(role)}"

    def bucket_path(self, bucket: str = "") -> str:
        return f"projects/_/buckets/{bucket or self.bucket}"

    def target_resources(self, target: str) -> list[str]:
        """The IAM resource names a `Grant.target` (or a call's target) stands for."""
        kind, _, arg = target.partition(":")
        queues = [f"{self.location_path}/queues/{q.name}" for q in self.queue_specs()]
        if kind == "project":
            return [f"projects/{self.project}"]
        if kind == "item_queues":
            return queues[:-1]
        if kind == "item_queue":
            return [queues[int(arg)]]
        if kind == "small_item_queue":
            return [queues[-2]]
        if kind == "control_queue":
            return [queues[-1]]
        if kind == "bucket":  # the watched bucket and the submit-only ones: ingest and the API read them alike
            return [self.bucket_path(b) for b in (self.bucket, *self.submit_buckets) if b]
        if kind == "secret":
            return [self.secret_path(arg)]
        if kind == "sa":
            return [self.sa_path(arg)]
        if kind == "run":
            return [self.run_service_path(arg)]
        raise ValueError(f"unknown grant target {target!r}")

    def with_changes(self, **kw) -> "Desired":
        return replace(self, **kw)


def from_settings(project: str, region: str, bucket: str = "", item_queue_shards: int | None = None,
                  **kw) -> Desired:
    """Desired state from `shared.config` (queue specs, shard count, bucket) and flags."""
    from shared.config import load_settings

    s = load_settings()
    shards = item_queue_shards if item_queue_shards is not None else s.item_queue_shards
    item = replace(ITEM_QUEUE, name=s.item_queue)
    small = replace(SMALL_ITEM_QUEUE, name=s.small_item_queue)
    control = replace(CONTROL_QUEUE, name=s.control_queue)
    return Desired(project=project, region=region, bucket=bucket or s.bucket,
                   item_queue_shards=shards, item_queue=item, small_item_queue=small,
                   small_job_max_lines=s.small_job_max_lines, control_queue=control, **kw)
