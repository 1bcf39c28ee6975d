"""Typed settings from the environment, one place for functions, CLI, local stack and infra."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any

from pydantic import AliasChoices, BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.exceptions import UpcfanError


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


# Item tasks: the task lives until its item is final; the item's retry budget is time, kept on the
# item document (`first_failed_at` + UPCFAN_ITEM_RETRY_WINDOW_S, decided by `shared/item_state.complete`),
# not a count of Cloud Tasks attempts.
# - max_attempts=-1 (unlimited): Cloud Tasks stops retrying only when max_attempts AND
#   max_retry_duration are both satisfied (RetryConfig reference, cloud.google.com/tasks/docs/reference/
#   rest/v2/projects.locations.queues#RetryConfig), so with -1 a task ends only on a 2xx, which the
#   worker answers only when the item is final (or its job is gone). A 409 or 503 never ends a task.
# - max_retry_duration=0 (unlimited): with -1 it could never end a task in Cloud Tasks anyway; 0 says
#   so, and the local emulator (which reads a positive duration as a limit even with -1) agrees. The
#   bound is Cloud Tasks' task retention (31 days): far past any retry window or operator pause.
# - max_backoff=300 s: during an outage each open item is tried at most every 5 minutes (about 72
#   attempts in a 6 h window, cheap), and once the marketplace (or an operator's resume) is back every
#   item is tried again within 5 minutes. A paused job's deliveries back off to this too.
# - 1 s doubling 6 times (1, 2, … 64 s, then +64 s steps to 300 s): a passing fault is retried
#   quickly, a long one settles at the cap within about 10 minutes.
ITEM_QUEUE = QueueSpec(
    name="upcfan-items",
    retry=RetryConfig(max_attempts=-1, min_backoff_s=1.0, max_backoff_s=300.0, max_doublings=6,
                      max_retry_duration_s=0.0),
    rate=RateLimits(max_dispatches_per_second=500.0, max_concurrent_dispatches=1000),
    # > the worker's worst case on an item's last attempt (`shared/deadlines.py`: ~160 s).
    dispatch_deadline_s=180,
)

# The small-jobs lane (issue 17): item tasks of a job whose file has at most UPCFAN_SMALL_JOB_MAX_LINES
# lines. Cloud Tasks dispatches one queue roughly in schedule-time order, so behind a million-item
# job's backlog a 500-line job would wait for the whole backlog; in its own queue, with its own rate
# and concurrency, it is dispatched beside the bulk job instead of after it. Same retry config and
# deadline as the item queue (the same worker, the same item life); less concurrency, because one
# small job at a time needs little and the lane must not become a second bulk queue.
SMALL_ITEM_QUEUE = QueueSpec(
    name="upcfan-items-small",
    retry=ITEM_QUEUE.retry,
    rate=RateLimits(max_dispatches_per_second=100.0, max_concurrent_dispatches=200),
    dispatch_deadline_s=ITEM_QUEUE.dispatch_deadline_s,
    # Locally one worker process serves both lanes, so its CPU is split by in-flight dispatches: as
    # many as the bulk queue's gives a small job at least half the worker while a bulk job runs (with
    # 16 against 32 it got a third, and took 3.0x its solo time in bench/fairness_bench.py). In
    # production the worker scales out and the lane's own 200 concurrent dispatches are its share.
    local_max_concurrent_dispatches=ITEM_QUEUE.local_max_concurrent_dispatches,
)

# The lanes a job's items may be dispatched in, decided once when the job is planned and recorded on
# the job document (`item_lane`); a job without one (planned before lanes existed) is bulk.
BULK_LANE = "bulk"
# Production's threshold: a job of up to 5,000 lines takes minutes at most, so it is never worth
# waiting behind a bulk backlog; it also bounds what the lane can be handed by one job.
SMALL_JOB_MAX_LINES = 5000
SMALL_LANE = "small"
ITEM_LANES = (BULK_LANE, SMALL_LANE)

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


class SettingsError(UpcfanError):
    """The environment's settings are invalid or incomplete; the message names each variable."""

    code = "bad_settings"
    http_status = 500


# Deprecated spellings of the default handler: no longer read. Named in the error that asks for
# UPCFAN_DEFAULT_HANDLER, so a deployment still setting them learns what replaced them.
DEPRECATED_DEFAULT_FLAGS = ("UPCFAN_DEFAULT_TEST_MODE", "UPCFAN_DEFAULT_CREATE_DRAFTS")


def _env(name: str, default: Any = ..., *, repr: bool = True, **constraints: Any) -> Any:
    """A field read from exactly the variable `name` (the variable names are the interface)."""
    return Field(default, validation_alias=name, repr=repr, **constraints)


def _url(raw: object) -> object:
    return raw.strip().rstrip("/") if isinstance(raw, str) else raw


def _stripped(raw: object) -> object:
    return raw.strip() if isinstance(raw, str) else raw


def _comma_list(raw: object) -> object:
    return tuple(part.strip() for part in raw.split(",") if part.strip()) if isinstance(raw, str) else raw


Url = Annotated[str, BeforeValidator(_url)]
CommaList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_list)]
Text = Annotated[str, BeforeValidator(_stripped)]
Flag = Annotated[bool, BeforeValidator(parse_bool)]  # parse_bool's reading, never pydantic's stricter one
Count = Annotated[int, Field(ge=1)]
Seconds = Annotated[float, Field(gt=0)]
Minutes = Annotated[float, Field(gt=0)]


class Settings(BaseSettings):
    """Every setting, read once from the environment and validated (pydantic-settings).

    A bad value fails here with the variable's name (`load_settings` raises `SettingsError`);
    which settings a function or CLI command cannot run without is `shared/required_settings.py`."""

    # Only the process environment (a profile or stack.env is loaded into it first); an empty
    # variable counts as unset, as it always has.
    model_config = SettingsConfigDict(frozen=True, case_sensitive=True, env_ignore_empty=True,
                                      populate_by_name=True, extra="ignore")

    project: Text = Field("demo-upcfan", validation_alias=AliasChoices("GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT"))
    location: Text = _env("UPCFAN_LOCATION", "us-central1")
    item_queue: Text = _env("UPCFAN_ITEM_QUEUE_NAME", ITEM_QUEUE.name, min_length=1)
    control_queue: Text = _env("UPCFAN_CONTROL_QUEUE_NAME", CONTROL_QUEUE.name, min_length=1)
    small_item_queue: Text = _env("UPCFAN_SMALL_ITEM_QUEUE_NAME", SMALL_ITEM_QUEUE.name, min_length=1)
    # A job whose file has at most this many lines runs in the small-jobs lane (0: no small lane,
    # every job is bulk). Lines as the plan task counts them (blank and header lines included): an
    # upper bound of the job's items, known before the first item task exists.
    small_job_max_lines: int = _env("UPCFAN_SMALL_JOB_MAX_LINES", SMALL_JOB_MAX_LINES, ge=0)
    item_queue_shards: Count = _env("UPCFAN_ITEM_QUEUE_SHARDS", 1)
    ingest_url: Url = _env("UPCFAN_INGEST_URL", "")
    worker_url: Url = _env("UPCFAN_WORKER_URL", "")
    marketplace_url: Url = _env("UPCFAN_MARKETPLACE_URL", "")
    # Where operators open the web console (an IAP address, or the fixed port of `upcfan console`); alerts
    # and job notes link to the job's page there. Empty: no link.
    console_url: Url = _env("UPCFAN_CONSOLE_URL", "")
    # Bearer token sent on every marketplace call (a Secret Manager secret in production, the local
    # stack's .local/secrets.env locally); never logged, and left out of the repr.
    marketplace_api_key: Text = _env("UPCFAN_MARKETPLACE_API_KEY", "", repr=False)
    # A secret too (the webhook URL is the credential).
    slack_webhook_url: Text = _env("UPCFAN_SLACK_WEBHOOK_URL", "", repr=False)
    bucket: Text = _env("UPCFAN_BUCKET", "")
    # Further buckets a file may be submitted from (POST /api/batch/process, the ingest HTTP trigger)
    # without being watched (UPCFAN_SUBMIT_BUCKETS, comma list). Every other bucket is refused.
    submit_buckets: CommaList = _env("UPCFAN_SUBMIT_BUCKETS", ())
    # The handler a job runs when neither its request nor its object's metadata chooses one: the
    # mode of dropped files (dry run or live), a deploy decision. Unset, nothing chooses for it:
    # ingest and api refuse to start (shared/required_settings.py) and a choice that needs it fails.
    default_handler: Text | None = _env("UPCFAN_DEFAULT_HANDLER", None)
    # OIDC service account used on task dispatch in production; empty locally.
    task_service_account: Text = _env("UPCFAN_TASK_SERVICE_ACCOUNT", "")
    # Ingest
    chunk_bytes: Count = _env("UPCFAN_CHUNK_BYTES", 256 * 1024)
    max_lines: Count = _env("UPCFAN_MAX_LINES", 2_000_000)
    fanout_threads: Count = _env("UPCFAN_FANOUT_THREADS", 32)  # concurrent CreateTask calls per process
    # Worker
    lease_s: Seconds = _env("UPCFAN_LEASE_S", 60.0)
    # 0 turns heartbeats off (shared/worker/lease.py::Heartbeat): tests use it to let a lease lapse.
    heartbeat_s: float = _env("UPCFAN_HEARTBEAT_S", 15.0, ge=0)
    # The item queue's max_attempts (-1: unlimited). Only the delivery's `last_attempt` reads it, and
    # with unlimited attempts no delivery is a last one: the item's retry window decides failure.
    item_max_attempts: int = _env("UPCFAN_ITEM_MAX_ATTEMPTS", ITEM_QUEUE.retry.max_attempts)
    # How long an item keeps being retried after its first retryable failure (or after its job was
    # last resumed, whichever is later) before it ends `failed`: long enough to ride out a marketplace
    # outage of hours, short enough that a job finishes the same day.
    item_retry_window_s: Seconds = _env("UPCFAN_ITEM_RETRY_WINDOW_S", 6 * 3600.0)
    # The per-job circuit breaker (shared/breaker.py): the job pauses when more than this percent of
    # its last UPCFAN_BREAKER_WINDOW finished attempts in one worker process ended in a permanent error,
    # once at least UPCFAN_BREAKER_MIN_ATTEMPTS of them are known.
    breaker_failure_percent: float = _env("UPCFAN_BREAKER_FAILURE_PERCENT", 50.0, gt=0, le=100)
    breaker_window: Count = _env("UPCFAN_BREAKER_WINDOW", 50)
    breaker_min_attempts: Count = _env("UPCFAN_BREAKER_MIN_ATTEMPTS", 20)
    progress_check_s: Seconds = _env("UPCFAN_PROGRESS_CHECK_S", 5.0)
    # Sweeper
    stall_minutes: Minutes = _env("UPCFAN_STALL_MINUTES", 15.0)
    stall_critical_minutes: Minutes = _env("UPCFAN_STALL_CRITICAL_MINUTES", 60.0)
    ingesting_stall_minutes: Minutes = _env("UPCFAN_INGESTING_STALL_MINUTES", 15.0)
    queued_stall_minutes: Minutes = _env("UPCFAN_QUEUED_STALL_MINUTES", 30.0)
    lease_overrun_minutes: Minutes = _env("UPCFAN_LEASE_OVERRUN_MINUTES", 10.0)
    alert_cooldown_minutes: Minutes = _env("UPCFAN_ALERT_COOLDOWN_MINUTES", 60.0)
    systemic_threshold: Count = _env("UPCFAN_SYSTEMIC_THRESHOLD", 3)
    # Operator
    max_retry_rounds: Count = _env("UPCFAN_MAX_RETRY_ROUNDS", 3)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings, env_settings)

    @field_validator("default_handler")
    @classmethod
    def _known_handler(cls, name: str | None) -> str | None:
        if not name:
            return None
        from shared.handlers.registry import known_handler_names  # lazy: the handlers read settings

        if name not in known_handler_names():
            raise ValueError(f"unknown handler {name!r}; known handlers: {', '.join(known_handler_names())}")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        # A heartbeat must renew the lease before it runs out, or a live item looks abandoned.
        if self.heartbeat_s >= self.lease_s:
            raise ValueError(f"UPCFAN_HEARTBEAT_S ({self.heartbeat_s:g}) must be less than UPCFAN_LEASE_S "
                             f"({self.lease_s:g})")
        if self.item_max_attempts != -1 and self.item_max_attempts < 1:
            raise ValueError(f"UPCFAN_ITEM_MAX_ATTEMPTS ({self.item_max_attempts}) must be -1 (unlimited) or at least 1")
        if self.breaker_min_attempts > self.breaker_window:
            raise ValueError(f"UPCFAN_BREAKER_MIN_ATTEMPTS ({self.breaker_min_attempts}) must be at most "
                             f"UPCFAN_BREAKER_WINDOW ({self.breaker_window})")
        bulk_names = {self.item_queue, *(f"{self.item_queue}-{i}" for i in range(1, self.item_queue_shards))}
        if self.small_item_queue in bulk_names | {self.control_queue}:
            raise ValueError(f"UPCFAN_SMALL_ITEM_QUEUE_NAME ({self.small_item_queue}) must name a queue of its own, "
                             f"not an item queue shard or the control queue")
        if self.stall_critical_minutes < self.stall_minutes:
            raise ValueError(f"UPCFAN_STALL_CRITICAL_MINUTES ({self.stall_critical_minutes:g}) must be at least "
                             f"UPCFAN_STALL_MINUTES ({self.stall_minutes:g})")
        return self

    @classmethod
    def variable(cls, field_name: str) -> str:
        """The environment variable a field is read from."""
        alias = cls.model_fields[field_name].validation_alias
        return alias.choices[0] if isinstance(alias, AliasChoices) else str(alias)

    def replace(self, **changes: Any) -> "Settings":
        """A validated copy with some fields changed (by field name), for tests and tools."""
        return type(self).model_validate({**self.model_dump(), **changes})

    @property
    def mode(self) -> str:
        """The mode of dropped files, as `/health` and `upcfan status` show it."""
        return handler_mode(self.default_handler)

    @property
    def allowed_buckets(self) -> tuple[str, ...]:
        """The buckets a job may read: the watched one, then the submit-only ones (none configured: any)."""
        return tuple(dict.fromkeys(b for b in (self.bucket, *self.submit_buckets) if b))

    def queue_path(self, queue_name: str) -> str:
        return f"projects/{self.project}/locations/{self.location}/queues/{queue_name}"

    def item_queue_path(self, shard: int = 0) -> str:
        name = self.item_queue if shard == 0 else f"{self.item_queue}-{shard}"
        return self.queue_path(name)

    def lane_queue_path(self, lane: str, shard: int = 0) -> str:
        """The queue of a lane: the small lane's one queue, or the bulk lane's shard `shard`."""
        if lane == SMALL_LANE:
            return self.queue_path(self.small_item_queue)
        if lane == BULK_LANE:
            return self.item_queue_path(shard)
        raise ValueError(f"unknown item lane {lane!r}; known lanes: {', '.join(ITEM_LANES)}")

    def lane_for_lines(self, raw_lines: int) -> str:
        """The lane of a job whose file has `raw_lines` lines (decided once, at planning)."""
        return SMALL_LANE if raw_lines <= self.small_job_max_lines else BULK_LANE

    @property
    def control_queue_path(self) -> str:
        return self.queue_path(self.control_queue)


def handler_mode(name: str | None) -> str:
    """`live`, `dry_run` or `unset`: what dropped files do when nothing else names a handler."""
    if not name:
        return "unset"
    return "dry_run" if name == "dry_run" else "live"


def _describe_error(err: dict) -> str:
    loc = err.get("loc") or ()
    field = str(loc[0]) if loc else ""
    if field in Settings.model_fields:
        field = Settings.variable(field)
    message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if not field:  # a rule across fields: its message names the variables
        return message
    raw = err.get("input")
    shown = "" if field in _SECRET_VARS or isinstance(raw, dict) or raw is None else f"={raw}"
    return f"{field}{shown}: {message}"


_SECRET_VARS = frozenset({"UPCFAN_MARKETPLACE_API_KEY", "UPCFAN_SLACK_WEBHOOK_URL"})


def load_settings() -> Settings:
    """Read and validate settings from the environment (a fresh read; use `settings()` for the cached
    one). Raises `SettingsError` naming every bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = [_describe_error(e) for e in exc.errors()]
        raise SettingsError("invalid settings: " + "; ".join(problems), code="bad_settings",
                            details={"problems": problems}) from None


@lru_cache(maxsize=1)
def settings() -> Settings:
    return load_settings()
