"""Slack alerts for the sweeper: Block Kit messages with a text fallback, delivered via an incoming webhook."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from shared.config import settings as _settings
from shared.durations import format_duration
from shared.retry import SLACK

# Slack answers 429 with Retry-After; we wait in-process only for short waits (at most
# `SLACK.attempts - 1` of them), otherwise the finding stays un-notified and the next sweep
# retries it (the webhook allows ~1 post/s).
MAX_RETRY_AFTER_WAIT_S = 3.0
WEBHOOK_TIMEOUT_S = 5

SEVERITY_EMOJI = {"CRITICAL": ":red_circle:", "WARNING": ":warning:", "INFO": ":white_check_mark:"}


def escape(text: Any) -> str:
    """Escape Slack's control characters (& < >) in any user-derived string."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@dataclass(frozen=True)
class SlackMessage:
    """A webhook payload: `text` is the notification/fallback, `blocks` the Block Kit body."""

    text: str
    blocks: list[dict] = field(default_factory=list)

    def to_payload(self) -> dict:
        return {"text": self.text, "blocks": self.blocks}


@dataclass(frozen=True)
class StallAlert:
    """What an operator needs about one stalled job; raw values, escaped when rendered."""

    severity: str  # WARNING | CRITICAL
    job_id: str
    kind: str
    reason: str
    gcs_path: str
    stalled_for_s: float
    succeeded: int
    failed: int
    open: int
    never_claimed: int | None
    detected_at: dt.datetime
    action: str = "flagged"  # flagged | escalated | reminder
    # Open items may have no task left (queued or lease-lapsed items not moving): the alert then names
    # the operator's re-drive (its dry run first). The sweeper itself never creates a task.
    stranded: bool = False


# Each action an alert suggests, as the CLI command and the API call that do it.
_OPERATOR_ACTIONS = (
    ("upcfan status {job}", "GET /api/batch/status/{job}"),
    ("upcfan items {job} --status failed", "GET /api/batch/jobs/{job}/items?status=failed"),
    ("upcfan retry-failed {job}", "POST /api/batch/jobs/{job}/retry-failed"),
    ("upcfan cancel {job}", "POST /api/batch/jobs/{job}/cancel"),
)


# Shown first when open items may be stranded: it lists them and changes nothing; without --dry-run it
# asks before giving each one new task.
_REDRIVE_ACTION = ("upcfan redrive {job} --dry-run", 'POST /api/batch/jobs/{job}/redrive {{"dry_run": true}}')


def operator_commands(job_id: str, stranded: bool = False) -> list[str]:
    actions = ((_REDRIVE_ACTION,) if stranded else ()) + _OPERATOR_ACTIONS
    return [cli.format(job=job_id) for cli, _ in actions]


def api_paths(job_id: str, stranded: bool = False) -> list[str]:
    actions = ((_REDRIVE_ACTION,) if stranded else ()) + _OPERATOR_ACTIONS
    return [api.format(job=job_id) for _, api in actions]


def console_link(job_id: str) -> str:
    """The job's page in the web console (UPCFAN_CONSOLE_URL), or '' when no console address is set."""
    from shared.console_view import job_page_url

    try:
        base = _settings().console_url
    except Exception:  # noqa: BLE001 - a message is still sent without the link
        base = ""
    return job_page_url(base, job_id)


def _with_console_link(blocks: list[dict], job_id: str) -> list[dict]:
    """`blocks` with a link to the job's console page before the closing context line (unchanged without one)."""
    url = console_link(job_id)
    if not url:
        return blocks
    link = {"type": "section", "text": {"type": "mrkdwn", "text": f"<{escape(url)}|Open job {escape(job_id)} in the console>"}}
    at = len(blocks) - 1 if blocks and blocks[-1].get("type") == "context" else len(blocks)
    return [*blocks[:at], link, *blocks[at:]]


def _code_lines(lines: list[str]) -> str:
    return "```" + "\n".join(escape(line) for line in lines) + "```"


def build_stall_message(alert: StallAlert) -> SlackMessage:
    """Block Kit stall alert: severity, job, file, counts, stalled for, and what the operator can do."""
    sev = escape(alert.severity)
    job = escape(alert.job_id)
    never = "unknown" if alert.never_claimed is None else str(alert.never_claimed)
    stalled_for = format_duration(alert.stalled_for_s)
    headline = {"escalated": "escalated to", "reminder": "still"}.get(alert.action, "")
    title = f"{sev}: upcfan job {job} {headline + ' ' if headline else ''}stalled ({escape(alert.kind)})"
    counts = (
        f"succeeded {alert.succeeded} · failed {alert.failed} · open {alert.open} · "
        f"never claimed {never}"
    )
    text = (
        f"{title} for {stalled_for}. File {escape(alert.gcs_path)}. {escape(alert.reason)}. "
        f"Counts: {counts}. Next: upcfan status {job}"
    )
    if alert.stranded:
        text += f"; open items may have no task left: upcfan redrive {job} --dry-run lists them"
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": f"{alert.severity}: job stalled"[:150]}},
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": f"{SEVERITY_EMOJI.get(alert.severity, '')} *{title}*"},
            "fields": [
                {"type": "mrkdwn", "text": f"*Severity*\n{sev}"},
                {"type": "mrkdwn", "text": f"*Job*\n`{job}`"},
                {"type": "mrkdwn", "text": f"*File*\n{escape(alert.gcs_path) or 'unknown'}"},
                {"type": "mrkdwn", "text": f"*Stalled for*\n{stalled_for}"},
                {"type": "mrkdwn", "text": f"*Counts*\n{counts}"},
                {"type": "mrkdwn", "text": f"*Detected*\n{alert.detected_at.isoformat(timespec='seconds')}"},
            ],
        },
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*Why*: {escape(alert.reason)}"}},
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": "*Operator commands* (the sweeper changes nothing; you decide)\n"
                + _code_lines(operator_commands(alert.job_id, alert.stranded)
                              + api_paths(alert.job_id, alert.stranded)),
            },
        },
        {
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": "upcfan sweeper · flags only, never retries or completes"}],
        },
    ]
    return SlackMessage(text=text, blocks=_with_console_link(blocks, alert.job_id))


def build_recovered_message(job_id: str, gcs_path: str, kind: str, how: str, stalled_for_s: float) -> SlackMessage:
    """The 'moved again' note for a job that was flagged."""
    job = escape(job_id)
    text = (
        f"RECOVERED: upcfan job {job} ({escape(kind)}) moved again after {format_duration(stalled_for_s)}: "
        f"{escape(how)}. File {escape(gcs_path)}."
    )
    blocks = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"{SEVERITY_EMOJI['INFO']} {text}"}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": escape(f"upcfan status {job_id}")}]},
    ]
    return SlackMessage(text=text, blocks=_with_console_link(blocks, job_id))


def build_systemic_message(stalled_jobs: int, threshold: int, job_ids: list[str], window_minutes: int = 60) -> SlackMessage:
    """One alert for many stalls: likely a shared cause (workers, queue, marketplace)."""
    shown = job_ids[:10]
    more = len(job_ids) - len(shown)
    listing = "\n".join(f"• `{escape(j)}`" for j in shown) + (f"\n… and {more} more" if more > 0 else "")
    text = (
        f"CRITICAL: systemic stall — {stalled_jobs} upcfan jobs stalled in the last {window_minutes} min "
        f"(threshold {threshold}). Check worker errors, queue state and the marketplace."
    )
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": "CRITICAL: systemic stall"}},
        {"type": "section", "text": {"type": "mrkdwn", "text": f"{SEVERITY_EMOJI['CRITICAL']} *{escape(text)}*"}},
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*Recently stalled jobs*\n{listing or 'none listed'}"}},
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": "*Look at*\n"
                + _code_lines(["upcfan jobs --status running", "GET /api/batch/jobs?status=running", "GET /health"]),
            },
        },
    ]
    return SlackMessage(text=text, blocks=blocks)


@dataclass(frozen=True)
class SlackPostResult:
    """Outcome of one post: never raises; `error` is a short specific reason without the URL."""

    ok: bool
    error: str | None = None
    status: int | None = None
    retry_after_s: float | None = None
    transient: bool = True


def post_message(
    message: SlackMessage,
    *,
    webhook_url: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> SlackPostResult:
    """Post to the Slack webhook. A 429 with a short Retry-After is waited out (within `SLACK.attempts`);
    nothing raises."""
    from slack_sdk.webhook import WebhookClient

    url = webhook_url if webhook_url is not None else _settings().slack_webhook_url
    if not url:
        return SlackPostResult(ok=False, error="slack webhook not configured (UPCFAN_SLACK_WEBHOOK_URL)",
                               transient=False)
    # No library retry handlers: our own bounded 429 wait below, everything else waits for the next sweep.
    client = WebhookClient(url, timeout=WEBHOOK_TIMEOUT_S, retry_handlers=[])
    waits_left = SLACK.attempts - 1
    while True:
        try:
            resp = client.send_dict(message.to_payload())
        except Exception as exc:  # connection refused, timeout, DNS: Slack unreachable
            return SlackPostResult(ok=False, error=f"slack unreachable: {type(exc).__name__}")
        if 200 <= resp.status_code < 300:
            return SlackPostResult(ok=True, status=resp.status_code)
        if resp.status_code != 429:
            body = (resp.body or "")[:80].replace("\n", " ")
            return SlackPostResult(ok=False, status=resp.status_code, transient=resp.status_code >= 500,
                                   error=f"slack answered {resp.status_code}: {body}")
        retry_after = _retry_after_s(resp.headers)
        if waits_left <= 0 or retry_after is None or retry_after > MAX_RETRY_AFTER_WAIT_S:
            return SlackPostResult(
                ok=False, status=429, retry_after_s=retry_after,
                error=f"slack rate limited (429, retry-after {retry_after if retry_after is not None else '?'}s)",
            )
        waits_left -= 1
        sleep(retry_after)


def _retry_after_s(headers: dict | None) -> float | None:
    for key, value in (headers or {}).items():
        if key.lower() == "retry-after":
            raw = value[0] if isinstance(value, (list, tuple)) else value
            try:
                return float(raw)
            except (TypeError, ValueError):
                return None
    return None


_FINAL_LABEL = {"completed": "completed", "completed_with_failures": "completed with failures"}


def build_job_finished_message(job: dict[str, Any]) -> SlackMessage:
    """INFO: a job reached its final status; what became of its lines and, with failures, what to do next."""
    job_id = str(job.get("job_id") or "?")
    jid = escape(job_id)
    status = str(job.get("status") or "?")
    totals = job.get("totals") or {}
    counts = job.get("counts") or {}
    failed = int(counts.get("failed") or 0)
    summary = (
        f"lines {int(totals.get('lines') or 0)} · succeeded {int(counts.get('succeeded') or 0)} · failed {failed} · "
        f"invalid {int(totals.get('invalid') or 0)} · duplicate {int(totals.get('duplicate') or 0)} · "
        f"cancelled {int(counts.get('cancelled') or 0)}"
    )
    label = escape(_FINAL_LABEL.get(status, status))
    text = f"INFO: upcfan job {jid} {label}. File {escape(job.get('gcs_path') or 'unknown')}. {summary}."
    next_steps = [f"upcfan status {job_id}", f"upcfan export {job_id}"]
    if job.get("results_path"):  # written by the job's results task moments after this note
        text += f" Results: {escape(job['results_path'])}."
    if failed:
        next_steps += [f"upcfan items {job_id} --status failed --csv", f"upcfan retry-failed {job_id}"]
        text += f" Next: upcfan items {jid} --status failed"
    blocks = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"{SEVERITY_EMOJI['INFO']} *upcfan job {jid} {label}*"},
         "fields": [
             {"type": "mrkdwn", "text": "*Severity*\nINFO"},
             {"type": "mrkdwn", "text": f"*Job*\n`{jid}`"},
             {"type": "mrkdwn", "text": f"*File*\n{escape(job.get('gcs_path') or 'unknown')}"},
             {"type": "mrkdwn", "text": f"*Lines*\n{summary}"},
             *([{"type": "mrkdwn", "text": f"*Results*\n{escape(job['results_path'])}"}] if job.get("results_path") else []),
         ]},
        {"type": "section", "text": {"type": "mrkdwn", "text": "*Next*\n" + _code_lines(next_steps)}},
        {"type": "context",
         "elements": [{"type": "mrkdwn", "text": "upcfan progress · sent once when a job finishes"}]},
    ]
    return SlackMessage(text=text, blocks=_with_console_link(blocks, job_id))


def _notify_job(note: str, build: Callable[[dict[str, Any]], SlackMessage], job: dict[str, Any],
                post: Callable[[SlackMessage], SlackPostResult] | None, **log_fields: Any) -> SlackPostResult:
    """Post one job note (`note`: started / finished); never raises: a failure is returned and logged,
    the job is unaffected."""
    from shared.log import log_event

    job_id = (job or {}).get("job_id")
    try:
        result = (post or post_message)(build(job or {}))
    except Exception as exc:  # noqa: BLE001 - a notification must never fail the fan-out or the progress check
        result = SlackPostResult(ok=False, error=f"job-{note} notice failed: {type(exc).__name__}: {exc}"[:300])
    if result.ok:
        log_event(f"job_{note}_notified", job_id=job_id, **log_fields)
    elif result.status is None and not result.transient:  # no webhook configured: nothing to tell
        log_event(f"job_{note}_not_notified", job_id=job_id, reason=result.error)
    else:
        log_event(f"job_{note}_notify_failed", severity="WARNING", job_id=job_id, error=result.error)
    return result


def notify_job_finished(job: dict[str, Any], *,
                        post: Callable[[SlackMessage], SlackPostResult] | None = None) -> SlackPostResult:
    """Post the job-finished note; never raises."""
    return _notify_job("finished", build_job_finished_message, job, post, status=(job or {}).get("status"))


def build_job_started_message(job: dict[str, Any]) -> SlackMessage:
    """INFO: fan-out is done and the job runs: what the file held and how to follow it."""
    job_id = str(job.get("job_id") or "?")
    jid = escape(job_id)
    totals = job.get("totals") or {}
    summary = (
        f"lines {int(totals.get('lines') or 0)} · items {int(totals.get('items') or 0)} · "
        f"invalid {int(totals.get('invalid') or 0)} · duplicate {int(totals.get('duplicate') or 0)} · "
        f"skipped {int(totals.get('skipped') or 0)}"
    )
    handler = escape(job.get("handler") or (job.get("options") or {}).get("handler") or "unknown")
    follow = [f"upcfan status {job_id}", f"upcfan events {job_id}", f"upcfan pause {job_id}",
              f"upcfan cancel {job_id}", f"GET /api/batch/status/{job_id}"]
    text = (f"INFO: upcfan job {jid} started. File {escape(job.get('gcs_path') or 'unknown')}. {summary}. "
            f"Handler {handler}. Follow: upcfan status {jid}")
    blocks = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"{SEVERITY_EMOJI['INFO']} *upcfan job {jid} started*"},
         "fields": [
             {"type": "mrkdwn", "text": "*Severity*\nINFO"},
             {"type": "mrkdwn", "text": f"*Job*\n`{jid}`"},
             {"type": "mrkdwn", "text": f"*File*\n{escape(job.get('gcs_path') or 'unknown')}"},
             {"type": "mrkdwn", "text": f"*Lines*\n{summary}"},
             {"type": "mrkdwn", "text": f"*Handler*\n{handler}"},
         ]},
        {"type": "section", "text": {"type": "mrkdwn", "text": "*Follow it*\n" + _code_lines(follow)}},
        {"type": "context",
         "elements": [{"type": "mrkdwn", "text": "upcfan ingest · sent once when a job's fan-out is done"}]},
    ]
    return SlackMessage(text=text, blocks=_with_console_link(blocks, job_id))


def notify_job_started(job: dict[str, Any], *,
                       post: Callable[[SlackMessage], SlackPostResult] | None = None) -> SlackPostResult:
    """Post the job-started note; never raises."""
    return _notify_job("started", build_job_started_message, job, post)


_PAUSE_WHY = {
    "marketplace_unauthorized": "the marketplace refused our credentials (401/403); every further call would be "
                                "refused too",
    "failure_rate": "too many of the job's recent items failed permanently",
    "max_failed_percent": "the job's failed items passed its max_failed_percent option",
    "operator": "an operator paused it",
}


def build_pause_message(job: dict[str, Any], code: str, message: str, actor: str) -> SlackMessage:
    """CRITICAL: a job paused (circuit breaker or operator): what happened, the job, why, what to do."""
    job_id = str(job.get("job_id") or "?")
    jid = escape(job_id)
    why = _PAUSE_WHY.get(code, code)
    commands = [f"upcfan status {job_id}", f"upcfan resume {job_id}", f"upcfan cancel {job_id}"]
    text = (f"CRITICAL: upcfan job {jid} paused ({escape(code)}): {escape(why)}. {escape(message)}. "
            f"File {escape(job.get('gcs_path') or 'unknown')}. No new side effects run until an operator acts: "
            f"fix the cause, then `upcfan resume {jid}`, or `upcfan cancel {jid}`.")
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": "CRITICAL: job paused"}},
        {"type": "section",
         "text": {"type": "mrkdwn", "text": f"{SEVERITY_EMOJI['CRITICAL']} *upcfan job {jid} paused* ({escape(code)})"},
         "fields": [
             {"type": "mrkdwn", "text": f"*Job*\n`{jid}`"},
             {"type": "mrkdwn", "text": f"*File*\n{escape(job.get('gcs_path') or 'unknown')}"},
             {"type": "mrkdwn", "text": f"*Reason*\n{escape(code)}: {escape(why)}"},
             {"type": "mrkdwn", "text": f"*By*\n{escape(actor)}"},
         ]},
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*What happened*: {escape(message) or 'no detail'}"}},
        {"type": "section", "text": {"type": "mrkdwn",
                                     "text": "*Operator commands* (items wait, their retry windows restart on resume)\n"
                                     + _code_lines(commands + [f"POST /api/batch/jobs/{job_id}/resume",
                                                               f"POST /api/batch/jobs/{job_id}/cancel"])}},
        {"type": "context",
         "elements": [{"type": "mrkdwn", "text": "upcfan circuit breaker · pausing only stops work; it never resumes on its own"}]},
    ]
    return SlackMessage(text=text, blocks=_with_console_link(blocks, job_id))


def notify_job_paused(job: dict[str, Any], code: str, message: str, actor: str, *,
                      post: Callable[[SlackMessage], SlackPostResult] | None = None) -> SlackPostResult:
    """Post the pause alert; never raises (a failure is returned and logged, the pause stands)."""
    from shared.log import log_event

    job_id = (job or {}).get("job_id")
    try:
        result = (post or post_message)(build_pause_message(job or {}, code, message, actor))
    except Exception as exc:  # noqa: BLE001 - an alert must never fail the pause
        result = SlackPostResult(ok=False, error=f"pause alert failed: {type(exc).__name__}: {exc}"[:300])
    if result.ok:
        log_event("job_pause_notified", job_id=job_id, code=code)
    else:
        log_event("job_pause_notify_failed", severity="WARNING", job_id=job_id, code=code, error=result.error)
    return result
