"""Typed settings from the environment, one place for functions, CLI, local stack and infra."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache


@dataclass(frozen=True)
class RetryConfig:
    """Cloud Tasks retry_config for a queue; the same numbers drive the emulator and production."""

    max_attempts: int
    min_backoff_s: float
    max_backoff_s: float
    max_doublings: int
    max_retry_duration_s: float = 0.0  # 0 = unlimited


@dataclass(frozen=True)
class RateLimits:
    max_dispatches_per_second: float
    max_concurrent_dispatches: int


@dataclass(frozen=True)
class QueueSpec:
    """A queue the product needs: name suffix, retry and rate limits, dispatch deadline."""

    name: str
    retry: RetryConfig
    rate: RateLimits
    # The dispatch deadline of the queue's tasks (Cloud Tasks keeps it per task, default 10 min):
    # set on every task by its kind (`shared.tasks.TaskKind`); budgets in `shared/deadlines.py`.
    dispatch_deadline_s: int
    # The local stack runs one process per function where production autoscales instances:
    # in-flight dispatches beyond what that process serves would only wait in its socket backlog.
    local_max_concurrent_dispatches: int = 32


# Item tasks: retried with backoff; attempts bound the worker's "last attempt" rule.
ITEM_QUEUE = QueueSpec(
    name="upcfan-items",
    retry=RetryConfig(max_attempts=8, min_backoff_s=1.0, max_backoff_s=60.0, max_doublings=4),
    rate=RateLimits(max_dispatches_per_second=500.0, max_concurrent_dispatches=1000),
    # > the worker's worst case on an item's last attempt (`shared/deadlines.py`: ~160 s).
    dispatch_deadline_s=180,
)

# Control tasks (file chunks, job progress checks) live apart so a backlog of items never
# delays a chunk or a completion check.
CONTROL_QUEUE = QueueSpec(
    name="upcfan-control",
    retry=RetryConfig(max_attempts=20, min_backoff_s=1.0, max_backoff_s=30.0, max_doublings=3),
    rate=RateLimits(max_dispatches_per_second=50.0, max_concurrent_dispatches=20),
    dispatch_deadline_s=600,  # chunk tasks (ingest /fanout)
    local_max_concurrent_dispatches=8,
)

# Progress checks ride the control queue but call the worker, whose timeout is the item deadline:
# their own deadline stays inside it (`shared/deadlines.py` checks budget < deadline <= timeout).
PROGRESS_DISPATCH_DEADLINE_S = 120


_TRUTHY = frozenset({"1", "true", "yes", "on"})


def parse_bool(raw: object) -> bool:
    """The one reading of a boolean given as text (environment, object metadata): 1/true/yes/on, any case."""
    return str(raw).strip().lower() in _TRUTHY


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return parse_bool(raw)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else default


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else default


@dataclass(frozen=True)
class Settings:
    project: str
    location: str
    item_queue: str
    control_queue: str
    item_queue_shards: int
    ingest_url: str
    worker_url: str
    marketplace_url: str
    # Bearer token sent on every marketplace call (a Secret Manager secret in production, the local
    # stack's .local/secrets.env locally); never logged, and left out of the repr.
    marketplace_api_key: str = field(repr=False)
    slack_webhook_url: str
    bucket: str
    # Further buckets a file may be submitted from (POST /api/batch/process, the ingest HTTP trigger)
    # without being watched (UPCFAN_SUBMIT_BUCKETS, comma list). Every other bucket is refused.
    submit_buckets: tuple[str, ...]
    # The handler a job runs when neither its request nor its object's metadata chooses one
    # (UPCFAN_DEFAULT_HANDLER). Unset, the deprecated boolean defaults below choose, as before names.
    default_handler: str | None
    default_create_drafts: bool
    default_test_mode: bool
    # Oidc service account used on task dispatch in production; empty locally.
    task_service_account: str
    # Ingest
    chunk_bytes: int
    max_lines: int
    fanout_threads: int  # concurrent CreateTask calls per process (shared by its chunks)
    # Worker
    lease_s: float
    heartbeat_s: float
    item_max_attempts: int
    progress_check_s: float
    # Sweeper
    stall_minutes: float
    stall_critical_minutes: float
    ingesting_stall_minutes: float
    queued_stall_minutes: float
    lease_overrun_minutes: float
    alert_cooldown_minutes: float
    systemic_threshold: int
    # Operator
    max_retry_rounds: int

    @property
    def allowed_buckets(self) -> tuple[str, ...]:
        """The buckets a job may read: the watched one, then the submit-only ones (none configured: any)."""
        return tuple(dict.fromkeys(b for b in (self.bucket, *self.submit_buckets) if b))

    def queue_path(self, queue_name: str) -> str:
        return f"projects/{self.project}/locations/{self.location}/queues/{queue_name}"

    def item_queue_path(self, shard: int = 0) -> str:
        name = self.item_queue if shard == 0 else f"{self.item_queue}-{shard}"
        return self.queue_path(name)

    @property
    def control_queue_path(self) -> str:
        return self.queue_path(self.control_queue)


def load_settings() -> Settings:
    """Read settings from the environment (a fresh read; use `settings()` for the cached one)."""
    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("GCLOUD_PROJECT") or "demo-upcfan"
    return Settings(
        project=project,
        location=os.environ.get("UPCFAN_LOCATION", "us-central1"),
        item_queue=os.environ.get("UPCFAN_ITEM_QUEUE_NAME", ITEM_QUEUE.name),
        control_queue=os.environ.get("UPCFAN_CONTROL_QUEUE_NAME", CONTROL_QUEUE.name),
        item_queue_shards=_env_int("UPCFAN_ITEM_QUEUE_SHARDS", 1),
        ingest_url=os.environ.get("UPCFAN_INGEST_URL", "").rstrip("/"),
        worker_url=os.environ.get("UPCFAN_WORKER_URL", "").rstrip("/"),
        marketplace_url=os.environ.get("UPCFAN_MARKETPLACE_URL", "").rstrip("/"),
        marketplace_api_key=os.environ.get("UPCFAN_MARKETPLACE_API_KEY", "").strip(),
        slack_webhook_url=os.environ.get("UPCFAN_SLACK_WEBHOOK_URL", ""),
        bucket=os.environ.get("UPCFAN_BUCKET", ""),
        submit_buckets=tuple(b.strip() for b in os.environ.get("UPCFAN_SUBMIT_BUCKETS", "").split(",") if b.strip()),
        default_handler=os.environ.get("UPCFAN_DEFAULT_HANDLER", "").strip() or None,
        default_create_drafts=_env_bool("UPCFAN_DEFAULT_CREATE_DRAFTS", False),
        default_test_mode=_env_bool("UPCFAN_DEFAULT_TEST_MODE", True),
        task_service_account=os.environ.get("UPCFAN_TASK_SERVICE_ACCOUNT", ""),
        chunk_bytes=_env_int("UPCFAN_CHUNK_BYTES", 256 * 1024),
        max_lines=_env_int("UPCFAN_MAX_LINES", 2_000_000),
        fanout_threads=_env_int("UPCFAN_FANOUT_THREADS", 32),
        lease_s=_env_float("UPCFAN_LEASE_S", 60.0),
        heartbeat_s=_env_float("UPCFAN_HEARTBEAT_S", 15.0),
        item_max_attempts=_env_int("UPCFAN_ITEM_MAX_ATTEMPTS", ITEM_QUEUE.retry.max_attempts),
        progress_check_s=_env_float("UPCFAN_PROGRESS_CHECK_S", 5.0),
        stall_minutes=_env_float("UPCFAN_STALL_MINUTES", 15.0),
        stall_critical_minutes=_env_float("UPCFAN_STALL_CRITICAL_MINUTES", 60.0),
        ingesting_stall_minutes=_env_float("UPCFAN_INGESTING_STALL_MINUTES", 15.0),
        queued_stall_minutes=_env_float("UPCFAN_QUEUED_STALL_MINUTES", 30.0),
        lease_overrun_minutes=_env_float("UPCFAN_LEASE_OVERRUN_MINUTES", 10.0),
        alert_cooldown_minutes=_env_float("UPCFAN_ALERT_COOLDOWN_MINUTES", 60.0),
        systemic_threshold=_env_int("UPCFAN_SYSTEMIC_THRESHOLD", 3),
        max_retry_rounds=_env_int("UPCFAN_MAX_RETRY_ROUNDS", 3),
    )


@lru_cache(maxsize=1)
def settings() -> Settings:
    return load_settings()
