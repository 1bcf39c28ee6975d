"""The operators' web console: server-rendered HTML pages over the same core calls as the JSON API.

Thin like the API's handlers: read through shared/operations.py, shape with shared/console_view.py,
render with the Jinja templates beside this file (autoescaped). The pages change nothing: actions are
the API's own POST routes, called by static/console.js after a confirmation.
"""

from __future__ import annotations

import functools
import mimetypes
from pathlib import Path
from typing import Any

from flask import Request, Response

from shared import console_view
from shared.exceptions import UpcfanError
from shared.log import log_event

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
ASSETS_DIR = HERE / "assets"
ASSET_FILES = frozenset({"console.js", "console.css"})
REFRESH_S = 5  # how often a page of a job that is not final reloads its live parts
JOBS_PER_PAGE = 20

# Same-origin everything, no inline script, no framing: the pages carry an operator's authority.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@functools.lru_cache(maxsize=1)
def _templates():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _html(template: str, status: int = 200, **context: Any) -> Response:
    body = _templates().get_template(template).render(refresh_s=REFRESH_S, **context)
    return Response(body, status=status, mimetype="text/html", headers=SECURITY_HEADERS)


def _ops():
    from shared import operations

    return operations


def _error_page(exc: UpcfanError, what: str) -> Response:
    status = exc.http_status if 400 <= exc.http_status < 600 else 500
    if status >= 500:
        log_event("console_error", severity="ERROR", page=what, error_code=exc.code, error=exc.message)
    return _html("error.html", status, code=exc.code, message=exc.message, title=f"{what}: {exc.code}", live=False)


def jobs_page(request: Request) -> Response:
    """GET /: jobs newest first, filtered by status and gs:// path, a page at a time."""
    filters = console_view.list_filters(request.args.to_dict())
    ops = _ops()
    try:
        listing = ops.list_jobs(limit=JOBS_PER_PAGE, status=filters.status, gcs_path=filters.gcs_path,
                                cursor=filters.cursor)
        # A job's own counts are written when it finishes; a live one is counted now.
        views = [summary if summary.get("status") in console_view.FINAL_STATUSES
                 else ops.get_job_status(summary["job_id"]) for summary in listing["jobs"]]
    except UpcfanError as exc:
        return _error_page(exc, "jobs")
    rows = [console_view.job_row(v) for v in views]
    return _html("jobs.html", title="upcfan jobs", rows=rows, filters=filters,
                 statuses=console_view.JOB_STATUS_VALUES, next_cursor=listing.get("next_cursor"),
                 live=any(not r.final for r in rows))


def job_page(request: Request, job_id: str) -> Response:
    """GET /jobs/{job_id}: counts, chart, stall history, timeline, failures by error code, actions."""
    ops = _ops()
    try:
        view = ops.get_job_status(job_id)
        events = ops.list_events(job_id, limit=500)
        failed = ops.list_items(job_id, status="failed", limit=console_view.FAILED_ROWS_READ)
        sample = ops.list_items(job_id, limit=console_view.CHART_SAMPLE)
    except UpcfanError as exc:
        return _error_page(exc, f"job {job_id[:200]}")
    page = console_view.job_page(view, events["events"], bool(events.get("next_cursor")), failed["items"],
                                 sample["items"])
    return _html("job.html", title=f"upcfan job {job_id}", page=page, live=page.live)


def asset_file(request: Request, name: str) -> Response:
    """GET /assets/{name}: the console's own script and stylesheet (nothing is fetched from elsewhere)."""
    if name not in ASSET_FILES:
        return Response("not found", status=404, mimetype="text/plain")
    mimetype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return Response((ASSETS_DIR / name).read_bytes(), mimetype=mimetype,
                    headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


# ---------------------------------------------------------------- request forgery

CONSOLE_HEADER = "X-Upcfan-Console"


def forged_request_reason(request: Request) -> str | None:
    """Why a state-changing request from a browser is refused, or None to let it through.

    The console's operator reaches the private API through a local proxy (or IAP) that adds their
    credentials to every request, so another site open in the same browser could post to it. A
    request a browser sends carries `Origin` or `Sec-Fetch-Site`; such a request must be same-origin
    and carry the `X-Upcfan-Console` header, which a page of another origin cannot add without a CORS
    preflight that this API never grants. Scripts and the CLI send neither browser header and are not
    affected.
    """
    fetch_site = request.headers.get("Sec-Fetch-Site")
    from_browser = fetch_site is not None or request.headers.get("Origin") is not None
    if not from_browser:
        return None
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"a {fetch_site} request from a browser may not change anything"
    if request.headers.get(CONSOLE_HEADER) != "1":
        return f"a request from a browser must come from the console (header {CONSOLE_HEADER}: 1)"
    return None
