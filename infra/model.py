"""The desired production shape, built from `shared/config.py` plus command-line flags.

Nothing here talks to Google: it only names things (service accounts, URLs, secrets,
queues) so that resources, the deploy script and the docs agree on one spelling.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from infra.sharding import shard_queue_name
from shared.config import CONTROL_QUEUE, ITEM_QUEUE, QueueSpec

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

SCHEDULER_JOB = "upcfan-sweeper"
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
    control_queue: QueueSpec = CONTROL_QUEUE
    sweep_schedule: str = "*/5 * * * *"
    url_template: str = DEFAULT_URL_TEMPLATE
    labels: dict = field(default_factory=lambda: dict(LABELS))

    # ---- names -------------------------------------------------------------------------
    def sa_email(self, role: str) -> str:
        return f"{SA_IDS[role]}@{self.project}.iam.gserviceaccount.com"

    def function_url(self, function: str) -> str:
        return self.url_template.format(region=self.region, project=self.project, function=function)

    @property
    def location_path(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    def queue_specs(self) -> list[QueueSpec]:
        """Item shards (`upcfan-items`, `upcfan-items-1`, ...) then the control queue."""
        shards = [
            replace(self.item_queue, name=shard_queue_name(self.item_queue.name, i))
            for i in range(self.item_queue_shards)
        ]
        return shards + [self.control_queue]

    def secret_path(self, secret_id: str) -> str:
        return f"projects/{self.project}/secrets/{secret_id}"

    def run_service_path(self, function: str) -> str:
        # A gen2 function runs as the Cloud Run service of the same name.
        return f"{self.location_path}/services/{function}"

    def with_changes(self, **kw) -> "Desired":
        return replace(self, **kw)


def from_settings(project: str, region: str, bucket: str = "", item_queue_shards: int | None = None,
                  **kw) -> Desired:
    """Desired state from `shared.config` (queue specs, shard count, bucket) and flags."""
    from shared.config import load_settings

    s = load_settings()
    shards = item_queue_shards if item_queue_shards is not None else s.item_queue_shards
    item = replace(ITEM_QUEUE, name=s.item_queue)
    control = replace(CONTROL_QUEUE, name=s.control_queue)
    return Desired(project=project, region=region, bucket=bucket or s.bucket,
                   item_queue_shards=shards, item_queue=item, control_queue=control, **kw)
