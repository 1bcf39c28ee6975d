"""What the operators' web console shows, as plain data: job rows, a job's page (counts, the finished-over-time
chart, stall history, timeline, failures grouped by error code) and the confirmation text of each action.

Knows nothing of HTTP or HTML: the api function reads through shared/operations.py, passes the answers here,
and renders the result with its templates (functions/api/templates/).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Iterable

from shared.durations import format_duration
from shared.model import JobStatus

FINAL_STATUSES = frozenset(s.value for s in JobStatus if s.is_final)
JOB_STATUS_VALUES = tuple(s.value for s in JobStatus)
# How many finished items the chart reads per view: the shape of "finished over time" from a sample in
# gtin order (unrelated to when an item finished), scaled to the job's finished count. Bounded so that a
# page refreshed every few seconds on a million-item job costs a few hundred reads, not a million.
CHART_SAMPLE = 500
CHART_BUCKETS = 40
CHART_WIDTH, CHART_HEIGHT = 600, 160
FAILED_ROWS_READ = 1000  # failed items read for the grouping (the counts say when there are more)
FAILED_ROWS_SHOWN = 20  # per error code
TIMELINE_EVENTS = 200
STALL_EVENT_TYPES = ("stall_flagged", "stall_recovered")


def parse_time(value: Any) -> dt.datetime | None:
    """An ISO-8601 string from the API's answers (or a datetime) as an aware UTC datetime; None otherwise."""
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def format_time(value: Any) -> str:
    at = parse_time(value)
    return at.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if at else "–"


def format_rate(rate: float | None) -> str:
    if rate is None:
        return "–"
    return f"{rate:.1f}/s" if rate >= 1 else f"{rate * 60:.1f}/min"


def status_label(status: str | None) -> str:
    return (status or "unknown").replace("_", " ")


# ---------------------------------------------------------------- jobs list


@dataclass(frozen=True)
class JobRow:
    job_id: str
    status: str
    status_text: str
    gcs_path: str
    final: bool
    items: int | None
    finished: int
    failed: int
    percent: float | None
    rate: str
    eta: str
    stalled: bool
    stall_text: str
    created: str

    @property
    def progress_text(self) -> str:
        if self.items is None:
            return "not fanned out yet"
        return f"{self.finished} of {self.items} finished ({self.percent or 0:.0f}%)"


def _finished(counts: dict[str, Any]) -> int:
    return sum(int(counts.get(k) or 0) for k in ("succeeded", "failed", "cancelled"))


def job_row(view: dict[str, Any]) -> JobRow:
    """One row of the jobs list from a job's status view (operations.get_job_status) or list summary."""
    status = view.get("status") or "unknown"
    totals = view.get("totals") or {}
    counts = view.get("counts") or {}
    items = totals.get("items") if ("items" in totals and (view.get("fanout_done_at") or status in FINAL_STATUSES)) \
        else None
    finished = _finished(counts)
    percent = view.get("percent")
    if percent is None and items is not None:
        percent = 100.0 if not items else round(min(100.0, 100.0 * finished / items), 2)
    stall = view.get("stall") or None
    return JobRow(
        job_id=str(view.get("job_id")), status=status, status_text=status_label(status),
        gcs_path=str(view.get("gcs_path") or ""), final=status in FINAL_STATUSES,
        items=int(items) if items is not None else None, finished=finished, failed=int(counts.get("failed") or 0),
        percent=percent, rate=format_rate(view.get("rate_items_per_s")),
        eta=format_duration(view.get("eta_s"), exact=True) if view.get("eta_s") is not None else "–",
        stalled=bool(stall), stall_text=stall_summary(stall), created=format_time(view.get("created_at")))


def stall_summary(stall: Any) -> str:
    """One line on a job's current stall flag (the sweeper's record on the job), empty when not stalled."""
    if not isinstance(stall, dict) or not stall:
        return ""
    kind = str(stall.get("kind") or stall.get("reason_code") or "stalled").replace("_", " ")
    severity = stall.get("severity") or stall.get("last_severity")
    since = format_time(stall.get("since") or stall.get("flagged_at") or stall.get("detected_at"))
    reason = stall.get("reason")
    text = f"{severity + ': ' if severity else ''}{kind}, flagged {since}"
    return f"{text} — {reason}" if reason else text


@dataclass(frozen=True)
class ListFilters:
    status: str | None = None
    gcs_path: str | None = None
    cursor: str | None = None

    def query(self, **changes: Any) -> str:
        """The list page's query string with some filters changed (None drops one)."""
        from urllib.parse import urlencode

        values = {"status": self.status, "gcs_path": self.gcs_path, "cursor": self.cursor, **changes}
        return urlencode({k: v for k, v in values.items() if v})


def list_filters(args: dict[str, str]) -> ListFilters:
    """The list page's filters from its query string; an unknown status is refused by the API's own check."""
    def clean(name: str) -> str | None:
        value = (args.get(name) or "").strip()
        return value or None

    return ListFilters(status=clean("status"), gcs_path=clean("gcs_path"), cursor=clean("cursor"))


# ---------------------------------------------------------------- job page: chart


@dataclass(frozen=True)
class Chart:
    points: str  # SVG polyline points, in the CHART_WIDTH x CHART_HEIGHT box
    start: str
    end: str
    total: int
    sampled: int
    estimated: bool  # True when the shape comes from a sample of the finished items
    width: int = CHART_WIDTH
    height: int = CHART_HEIGHT

    @property
    def description(self) -> str:
        if not self.total:
            return "No items have finished yet."
        how = (f"estimated from {self.sampled} of {self.total} finished items" if self.estimated
               else f"all {self.total} finished items")
        return f"Items finished over time, {self.start} to {self.end} ({how})."


def finished_chart(finish_times: Iterable[Any], total_finished: int, buckets: int = CHART_BUCKETS) -> Chart:
    """Cumulative items finished over time as an SVG polyline: the sampled items' finish times, bucketed
    and scaled so the line ends at `total_finished` (exact when the sample is every finished item)."""
    times = sorted(t for t in (parse_time(v) for v in finish_times) if t is not None)
    total = max(int(total_finished), len(times))
    if not times:
        return Chart(points="", start="–", end="–", total=total, sampled=0, estimated=False)
    start, end = times[0], times[-1]
    span = max((end - start).total_seconds(), 1e-9)
    counts = [0] * buckets
    for t in times:
        counts[min(buckets - 1, int((t - start).total_seconds() / span * buckets))] += 1
    scale = total / len(times)
    points, cumulative = [f"0,{CHART_HEIGHT}"], 0
    for i, n in enumerate(counts):
        cumulative += n
        x = round((i + 1) * CHART_WIDTH / buckets, 1)
        y = round(CHART_HEIGHT - (cumulative * scale / total) * (CHART_HEIGHT - 4), 1)
        points.append(f"{x},{y}")
    return Chart(points=" ".join(points), start=format_time(start), end=format_time(end), total=total,
                 sampled=len(times), estimated=len(times) < total)


# ---------------------------------------------------------------- job page: failures, events, stalls


@dataclass(frozen=True)
class FailureGroup:
    code: str
    count: int
    rows: list[dict[str, Any]]

    @property
    def more(self) -> int:
        return self.count - len(self.rows)


def failure_groups(failed_items: Iterable[dict[str, Any]], shown: int = FAILED_ROWS_SHOWN) -> list[FailureGroup]:
    """Failed items grouped by error code, largest group first; each with up to `shown` rows (line, UPC,
    GTIN, message) in file order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in failed_items:
        error = item.get("error") or {}
        code = str(error.get("code") or "unknown")
        groups.setdefault(code, []).append({
            "line": item.get("line"), "upc": item.get("upc") or "", "gtin": item.get("gtin") or "",
            "message": str(error.get("message") or ""), "attempt": item.get("attempt"), "round": item.get("round")})
    out = []
    for code, rows in groups.items():
        rows.sort(key=lambda r: (r["line"] is None, r["line"] or 0))
        out.append(FailureGroup(code=code, count=len(rows), rows=rows[:shown]))
    return sorted(out, key=lambda g: (-g.count, g.code))


@dataclass(frozen=True)
class EventRow:
    at: str
    type: str
    actor: str
    details: str


def _details_text(details: Any) -> str:
    if not isinstance(details, dict) or not details:
        return ""
    parts = []
    for key, value in details.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        parts.append(f"{key}: {value}")
    return "; ".join(parts)[:500]


def event_rows(events: Iterable[dict[str, Any]]) -> list[EventRow]:
    return [EventRow(at=format_time(e.get("at")), type=str(e.get("type") or ""), actor=str(e.get("actor") or ""),
                     details=_details_text(e.get("details"))) for e in events]


def stall_history(events: Iterable[dict[str, Any]]) -> list[EventRow]:
    """The job's stall flags and recoveries (the sweeper's events), oldest first."""
    return event_rows(e for e in events if e.get("type") in STALL_EVENT_TYPES)


# ---------------------------------------------------------------- job page: actions


@dataclass(frozen=True)
class Action:
    """An operator action offered on a job's page, with the words its confirmation shows."""

    name: str  # the API's path segment: cancel, pause, resume, retry-failed, redrive
    label: str
    confirm: str  # what it will do and to how many items; the re-drive's count comes from its dry run
    count: int | None = None
    danger: bool = False


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def actions(view: dict[str, Any]) -> list[Action]:
    """The actions the API would accept for the job as it is now (it still refuses what it must)."""
    status = view.get("status")
    counts = view.get("counts") or {}
    job_id = view.get("job_id")
    open_items = int(counts.get("queued") or 0) + int(counts.get("processing") or 0)
    failed = int(counts.get("failed") or 0)
    out: list[Action] = []
    if status in (JobStatus.RUNNING.value, JobStatus.INGESTING.value):
        out.append(Action("pause", "Pause", f"Pause job {job_id}: its {_n(open_items, 'open item')} stop before their "
                                            "next marketplace call and wait until you resume it.", open_items))
    if status == JobStatus.PAUSED.value:
        out.append(Action("resume", "Resume", f"Resume job {job_id}: its {_n(open_items, 'open item')} run again, "
                                              "each with a fresh retry window.", open_items))
    if status in (JobStatus.RUNNING.value, JobStatus.PAUSED.value):
        out.append(Action("redrive", "Re-drive stranded items",
                          f"Re-drive job {job_id}: give one new task to each open item whose task is gone "
                          "(counted by a dry run when you click).", None))
    if status not in FINAL_STATUSES and status is not None:
        out.append(Action("cancel", "Cancel job", f"Cancel job {job_id}: its {_n(open_items, 'open item')} are "
                                                  "cancelled and never run; finished items stay as they are. "
                                                  "This cannot be undone.", open_items, danger=True))
    if status == JobStatus.COMPLETED_WITH_FAILURES.value and failed:
        out.append(Action("retry-failed", "Retry failed items",
                          f"Retry job {job_id}'s {_n(failed, 'failed item')} in a new round; succeeded items are "
                          "never run again.", failed))
    return out


def redrive_confirmation(job_id: str, stranded: int, examined: int, more: bool) -> str:
    """The re-drive's confirmation once its dry run answered."""
    if not stranded:
        return f"Job {job_id}: none of the {_n(examined, 'open item')} checked is stranded; nothing to re-drive."
    scope = " (of the first page checked; run it again for the rest)" if more else ""
    return (f"Re-drive job {job_id}: create one new task for each of {_n(stranded, 'stranded open item')}"
            f"{scope}. Items with a live task are not touched.")


# ---------------------------------------------------------------- job page


@dataclass(frozen=True)
class JobPage:
    row: JobRow
    view: dict[str, Any]
    count_rows: list[tuple[str, int]]
    outcome_rows: list[tuple[str, int]]
    chart: Chart
    stalls: list[EventRow]
    timeline: list[EventRow]
    timeline_more: bool
    failures: list[FailureGroup]
    failed_total: int
    actions: list[Action] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return not self.row.final


def job_page(view: dict[str, Any], events: list[dict[str, Any]], events_more: bool,
             failed_items: list[dict[str, Any]], finished_sample: list[dict[str, Any]]) -> JobPage:
    """Everything the job page shows, from the API core's answers: status view, events (oldest first),
    failed items, and a sample of finished items (any status; those without `finished_at` are skipped)."""
    counts = view.get("counts") or {}
    count_rows = [(k, int(counts.get(k) or 0)) for k in
                  ("queued", "processing", "succeeded", "failed", "cancelled", "never_claimed") if k in counts]
    outcome = view.get("outcome") or {}
    outcome_rows = [(k, int(v or 0)) for k, v in outcome.items()]
    finished_total = _finished(counts)
    chart = finished_chart((i.get("finished_at") for i in finished_sample), finished_total)
    return JobPage(row=job_row(view), view=view, count_rows=count_rows, outcome_rows=outcome_rows, chart=chart,
                   stalls=stall_history(events), timeline=event_rows(events[-TIMELINE_EVENTS:]),
                   timeline_more=events_more or len(events) > TIMELINE_EVENTS,
                   failures=failure_groups(failed_items), failed_total=int(counts.get("failed") or 0),
                   actions=actions(view))


def job_page_url(base_url: str, job_id: str) -> str:
    """The job's page in the console at `base_url` (e.g. the URL `upcfan console` serves); '' without one."""
    from urllib.parse import quote

    base = (base_url or "").rstrip("/")
    return f"{base}/jobs/{quote(job_id, safe='')}" if base else ""
