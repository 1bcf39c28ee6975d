"""Which settings each function cannot run without, in one table, checked once at start-up.

`shared/config.py` validates values (a bad value fails wherever settings are read); this module says
which variables must be *present* for a component. Each function's main.py calls
`require_settings("<function>")` at import, so a deployed function that lacks one fails to start
(functions-framework exits naming the function and the variables) instead of failing on its first
request, or worse, doing something else quietly (a dry run for a live deployment: issue 14, defect 9).
The CLI declares its commands' needs with the same `Requirement` (upcfan_cli/main.py).

Derived from what the code reads (a variable with a safe default, such as a queue name, is not here):
tasks name their target's URL (`shared/tasks.py`: item and progress tasks -> the worker, chunk tasks
-> ingest), carry an OIDC token for UPCFAN_TASK_SERVICE_ACCOUNT in production, job notes post to the
Slack webhook (`shared/progress.py`, from the worker, ingest and api), ingest and api choose a new
job's handler (`shared/handlers/choice.py`), the marketplace handler needs its URL and key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from shared.config import DEPRECATED_DEFAULT_FLAGS, Settings, SettingsError, settings


def emulated(env: Mapping[str, str]) -> bool:
    """The local stack (or a test) runs against the emulators: Cloud Tasks dispatches without OIDC."""
    return bool(env.get("CLOUD_TASKS_EMULATOR_HOST"))


Condition = Callable[[Settings, Mapping[str, str]], bool]


def always(s: Settings, env: Mapping[str, str]) -> bool:
    return True


def in_production(s: Settings, env: Mapping[str, str]) -> bool:
    return not emulated(env)


def live_default(s: Settings, env: Mapping[str, str]) -> bool:
    return s.mode == "live"


@dataclass(frozen=True)
class Requirement:
    """`variable` must be set (non-empty) when `when` holds; `why` is what breaks without it."""

    variable: str
    why: str
    when: Condition = always
    condition: str = ""  # when it applies, in words ("" = always)

    def applies(self, s: Settings, env: Mapping[str, str]) -> bool:
        return self.when(s, env)


PROJECT = Requirement("GOOGLE_CLOUD_PROJECT", "the project of Firestore, the queues and the bucket")
LOCATION = Requirement("UPCFAN_LOCATION", "the region of the queues")
BUCKET = Requirement("UPCFAN_BUCKET", "the watched bucket: finalize events elsewhere are ignored")
INGEST_URL = Requirement("UPCFAN_INGEST_URL", "chunk tasks are sent to ingest's /fanout")
WORKER_URL = Requirement("UPCFAN_WORKER_URL", "item and progress tasks are sent to the worker")
TASK_SA = Requirement("UPCFAN_TASK_SERVICE_ACCOUNT", "tasks carry an OIDC token of this account",
                      in_production, "in production, without the Cloud Tasks emulator")
DEFAULT_HANDLER = Requirement("UPCFAN_DEFAULT_HANDLER", "the mode of dropped files: dry_run, or a live handler "
                              "such as marketplace_draft; " + " and ".join(DEPRECATED_DEFAULT_FLAGS)
                              + " are no longer read")
MARKETPLACE_URL = Requirement("UPCFAN_MARKETPLACE_URL", "the default handler sends items to the marketplace",
                              live_default, "when UPCFAN_DEFAULT_HANDLER is live")
MARKETPLACE_KEY = Requirement("UPCFAN_MARKETPLACE_API_KEY", "the marketplace's bearer token, secret "
                              "upcfan-marketplace-api-key", live_default, "when UPCFAN_DEFAULT_HANDLER is live")
SLACK_WEBHOOK = Requirement("UPCFAN_SLACK_WEBHOOK_URL", "stall alerts and job notes go to Slack, secret "
                            "upcfan-slack-webhook")

# Where a queue has a default name, a function (deployed with the names) needs none; an operator's CLI
# talking to production must use the deployed names and shard count, or its tasks would go to queues
# (or shards) nothing dispatches, under names that no longer deduplicate.
ITEM_QUEUE_NAME = Requirement("UPCFAN_ITEM_QUEUE_NAME", "the deployed item queue", in_production,
                              "in production")
ITEM_QUEUE_SHARDS = Requirement("UPCFAN_ITEM_QUEUE_SHARDS", "item tasks are spread over the deployed shards",
                                in_production, "in production")
SMALL_ITEM_QUEUE_NAME = Requirement("UPCFAN_SMALL_ITEM_QUEUE_NAME", "the deployed small-jobs item queue (a small "
                                   "job's retry rounds and re-drives go there)", in_production, "in production")
CONTROL_QUEUE_NAME = Requirement("UPCFAN_CONTROL_QUEUE_NAME", "the deployed control queue", in_production,
                                 "in production")

# function -> what it cannot start without. tests/unit/test_required_settings.py checks that deploy's
# env and mounted secrets (infra/deploy.py) satisfy every row.
FUNCTION_SETTINGS: dict[str, tuple[Requirement, ...]] = {
    "ingest": (PROJECT, LOCATION, BUCKET, INGEST_URL, WORKER_URL, TASK_SA, DEFAULT_HANDLER, SLACK_WEBHOOK),
    "worker": (PROJECT, LOCATION, WORKER_URL, TASK_SA, MARKETPLACE_URL, MARKETPLACE_KEY, SLACK_WEBHOOK),
    "api": (PROJECT, LOCATION, INGEST_URL, WORKER_URL, TASK_SA, DEFAULT_HANDLER, SLACK_WEBHOOK),
    "sweeper": (PROJECT, SLACK_WEBHOOK),
}


def missing(requirements: Iterable[Requirement], s: Settings, env: Mapping[str, str] | None = None) -> list[Requirement]:
    """The requirements that apply and whose variable is unset or empty."""
    env = os.environ if env is None else env
    return [r for r in requirements if r.applies(s, env) and not str(env.get(r.variable, "")).strip()]


def describe_missing(gaps: Iterable[Requirement]) -> str:
    return "; ".join(f"{r.variable} ({r.why}{', required ' + r.condition if r.condition else ''})" for r in gaps)


def require_settings(function: str, env: Mapping[str, str] | None = None) -> Settings:
    """The validated settings of `function`, or `SettingsError` naming the function and every missing
    or invalid variable (logged as one CRITICAL line first, so Cloud Logging shows why it did not start)."""
    from shared.log import log_event

    env = os.environ if env is None else env
    try:
        s = settings()
    except SettingsError as exc:
        message = f"{function} cannot start: {exc.message}"
        log_event("settings_invalid", severity="CRITICAL", function=function, error=message)
        raise SettingsError(message, code=exc.code, details={"function": function, **exc.details}) from None
    gaps = missing(FUNCTION_SETTINGS[function], s, env)
    if gaps:
        message = (f"{function} cannot start: missing {describe_missing(gaps)}. scripts/deploy sets these "
                   f"(docs/operations.md, \"Settings each function requires\")")
        log_event("settings_missing", severity="CRITICAL", function=function,
                  missing=[r.variable for r in gaps], error=message)
        raise SettingsError(message, code="settings_missing",
                            details={"function": function, "missing": [r.variable for r in gaps]})
    return s
