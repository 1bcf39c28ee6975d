"""The console's HTML pages and the API's request-forgery defence, through the deployed app with a fake core."""

from __future__ import annotations

import re

import pytest

from shared import operations
from shared.exceptions import BadRequestError, NotFoundError
from deployed_env import create_function_app

RUNNING = {"job_id": "job-<1>", "status": "running", "gcs_path": "gs://b/<script>alert(1)</script>.csv",
           "totals": {"items": 3}, "counts": {"queued": 1, "processing": 0, "succeeded": 1, "failed": 1,
                                               "cancelled": 0, "never_claimed": 1},
           "outcome": {"lines": 3, "succeeded": 1, "failed": 1, "pending": 1}, "fanout_done_at": "2026-11-30T12:00:00Z",
           "percent": 66.67, "rate_items_per_s": 2.0, "eta_s": 1.0, "stall": None, "round": 1,
           "created_at": "2026-11-30T11:59:00Z", "pause": None, "error": None}
FAILED = {"gtin": "00036000291452", "upc": "036000291452", "line": 2, "round": 1, "status": "failed",
          "error": {"code": "marketplace_rejected", "message": "the marketplace rejects <this> product"},
          "finished_at": "2026-11-30T12:00:02Z"}


class FakeCore:
    def __init__(self):
        self.calls = []

    def list_jobs(self, limit, status, gcs_path, cursor):
        self.calls.append(("jobs", limit, status, gcs_path, cursor))
        if status == "bogus":
            raise BadRequestError("status must be one of ...; got 'bogus'", code="bad_status")
        return {"jobs": [{"job_id": "job-<1>", "status": "running"},
                         {"job_id": "done", "status": "completed", "totals": {"items": 2},
                          "counts": {"succeeded": 2}}], "next_cursor": "done"}

    def get_job_status(self, job_id, now=None):
        self.calls.append(("status", job_id))
        if job_id == "missing":
            raise NotFoundError("job 'missing' not found", code="job_not_found")
        return dict(RUNNING, job_id=job_id)

    def list_events(self, job_id, limit=100, cursor=None):
        return {"events": [{"type": "created", "actor": "http", "at": "2026-11-30T11:59:00Z", "details": {}},
                           {"type": "stall_flagged", "actor": "sweeper", "at": "2026-11-30T12:20:00Z",
                            "details": {"kind": "no_progress"}}], "next_cursor": None}

    def list_items(self, job_id, status=None, limit=100, cursor=None):
        self.calls.append(("items", job_id, status, limit))
        return {"items": [FAILED], "next_cursor": None}

    def cancel_job(self, job_id, actor):
        self.calls.append(("cancel", job_id, actor))
        return {"job_id": job_id, "status": "cancelled"}


@pytest.fixture
def core(monkeypatch):
    fake = FakeCore()
    for name in ("list_jobs", "get_job_status", "list_events", "list_items", "cancel_job"):
        monkeypatch.setattr(operations, name, getattr(fake, name))
    return fake


@pytest.fixture(scope="module")
def client():
    return create_function_app("api").test_client()


def test_jobs_list_is_escaped_html_with_progress_filters_and_paging(client, core):
    resp = client.get("/?status=running&gcs_path=gs://b/x")
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    html = resp.get_data(as_text=True)
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'href="/jobs/job-%3C1%3E"' in html and "2 of 3 finished (67%)" in html
    assert re.search(r'<progress [^>]*max="3" value="2"', html)
    assert 'rel="next"' in html and "cursor=done" in html
    assert ("jobs", 20, "running", "gs://b/x", None) in core.calls
    assert ("status", "job-<1>") in core.calls and ("status", "done") not in core.calls  # final: its own counts
    assert 'data-live="true"' in html


def test_a_refused_filter_is_an_html_page_naming_the_problem(client, core):
    resp = client.get("/?status=bogus")
    assert resp.status_code == 400 and resp.mimetype == "text/html"
    assert "bad_status" in resp.get_data(as_text=True)


def test_job_page_shows_counts_chart_failures_stalls_timeline_actions_and_results_link(client, core):
    resp = client.get("/jobs/j1")
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    assert 'data-error-code="marketplace_rejected"' in html and "rejects &lt;this&gt; product" in html
    assert "<polyline" in html and "stall flagged" in html and "Timeline" in html
    assert 'href="/api/batch/jobs/j1/results.csv"' in html
    for action in ("pause", "redrive", "cancel"):
        assert f'data-action="{action}"' in html
    assert ("items", "j1", "failed", 1000) in core.calls


def test_unknown_job_page_is_404_html(client, core):
    resp = client.get("/jobs/missing")
    assert resp.status_code == 404 and "job_not_found" in resp.get_data(as_text=True)


def test_asset_files_are_served_and_nothing_else(client):
    js = client.get("/assets/console.js")
    assert js.status_code == 200 and js.mimetype in ("text/javascript", "application/javascript")
    assert client.get("/assets/console.css").mimetype == "text/css"
    assert client.get("/assets/main.py").status_code == 404
    assert client.get("/assets/..%2fmain.py").status_code == 404


@pytest.mark.parametrize("headers, allowed", [
    ({}, True),  # the CLI, scripts, Cloud Scheduler: no browser headers
    ({"Origin": "http://127.0.0.1:8765", "Sec-Fetch-Site": "same-origin", "X-Upcfan-Console": "1"}, True),
    ({"Origin": "http://127.0.0.1:8765", "Sec-Fetch-Site": "same-origin"}, False),  # no console header
    ({"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site", "X-Upcfan-Console": "1"}, False),
    ({"Origin": "http://127.0.0.1:9999", "Sec-Fetch-Site": "same-site", "X-Upcfan-Console": "1"}, False),
    ({"Origin": "https://evil.example"}, False),  # an older browser: Origin alone
])
def test_a_browsers_post_must_be_same_origin_and_from_the_console(client, core, headers, allowed):
    resp = client.post("/api/batch/jobs/j1/cancel", headers=headers)
    if allowed:
        assert resp.status_code == 200 and ("cancel", "j1", "unauthenticated") in core.calls
    else:
        assert resp.status_code == 403 and resp.get_json()["error"]["code"] == "forbidden_origin"
        assert not [c for c in core.calls if c[0] == "cancel"]


def test_openapi_does_not_list_the_html_pages(client):
    paths = client.get("/openapi.json").get_json()["paths"]
    assert "/" not in paths and not any(p.startswith(("/jobs", "/static")) for p in paths)


@pytest.mark.parametrize("over, shows", [
    ({"status": "paused", "pause": {"code": "operator", "message": "checking the feed", "actor": "a@example.com"}},
     ["checking the feed (by a@example.com)", 'data-action="resume"']),
    ({"status": "failed", "error": {"code": "unreadable", "message": "not a UPC file"}, "fanout_done_at": None},
     ["not a UPC file", "status-failed"]),
    ({"status": "completed", "stall": {"kind": "no_progress", "flagged_at": "2026-11-30T12:20:00Z"}},
     ["stalled", "no progress, flagged 2026-11-30 12:20:00 UTC", 'data-live="false"']),
])
def test_job_page_of_paused_failed_and_stalled_jobs(client, core, monkeypatch, over, shows):
    monkeypatch.setattr(operations, "get_job_status", lambda job_id, now=None: dict(RUNNING, job_id=job_id, **over))
    resp = client.get("/jobs/j1")
    assert resp.status_code == 200, resp.get_data(as_text=True)[:2000]
    html = resp.get_data(as_text=True)
    for text in shows:
        assert text in html
