"""The console's view model (shared/console_view.py): rows, chart, failure groups, stall history, actions."""

from __future__ import annotations

import datetime as dt

from shared import console_view as cv

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.timezone.utc)


def _iso(seconds: float) -> str:
    return (T0 + dt.timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def _view(**over):
    view = {"job_id": "j1", "status": "running", "gcs_path": "gs://b/f.csv", "totals": {"items": 10},
            "counts": {"queued": 4, "processing": 1, "succeeded": 4, "failed": 1, "cancelled": 0, "never_claimed": 2},
            "fanout_done_at": _iso(0), "percent": 50.0, "rate_items_per_s": 0.5, "eta_s": 10.0, "stall": None,
            "created_at": _iso(-5), "round": 1}
    view.update(over)
    return view


def test_job_row_of_a_running_job():
    row = cv.job_row(_view())
    assert (row.items, row.finished, row.failed, row.percent, row.final) == (10, 5, 1, 50.0, False)
    assert row.rate == "30.0/min" and row.eta == "10s" and not row.stalled
    assert row.progress_text == "5 of 10 finished (50%)"
    assert row.created == "2026-11-30 11:59:55 UTC"


def test_job_row_from_a_list_summary_computes_percent_and_a_job_not_fanned_out_has_no_total():
    summary = {"job_id": "j2", "status": "completed", "totals": {"items": 4}, "counts": {"succeeded": 3, "failed": 1}}
    row = cv.job_row(summary)
    assert row.percent == 100.0 and row.final and row.rate == "–" and row.eta == "–"
    ingesting = cv.job_row({"job_id": "j3", "status": "ingesting", "totals": {"items": 7}, "counts": {}})
    assert ingesting.items is None and ingesting.progress_text == "not fanned out yet"


def test_stall_badge_says_kind_severity_and_when():
    row = cv.job_row(_view(stall={"kind": "no_progress", "severity": "WARNING", "flagged_at": _iso(60),
                                  "reason": "no item finished for 15 minutes"}))
    assert row.stalled
    assert row.stall_text == "WARNING: no progress, flagged 2026-11-30 12:01:00 UTC — no item finished for 15 minutes"


def test_chart_is_exact_for_every_item_and_scaled_for_a_sample():
    exact = cv.finished_chart([_iso(s) for s in (0, 10, 20, 30)], 4, buckets=4)
    assert not exact.estimated and exact.total == 4 and exact.sampled == 4
    points = [tuple(map(float, p.split(","))) for p in exact.points.split()]
    assert points[0] == (0.0, cv.CHART_HEIGHT) and points[-1] == (cv.CHART_WIDTH, 4.0)  # ends at the top
    assert [y for _, y in points] == sorted((y for _, y in points), reverse=True)  # cumulative: never falls
    sampled = cv.finished_chart([_iso(0), _iso(5), None, "not a time"], 1000)
    assert sampled.estimated and sampled.sampled == 2 and "estimated from 2 of 1000" in sampled.description
    assert cv.finished_chart([], 0).points == "" and "No items" in cv.finished_chart([], 0).description


def test_failures_grouped_by_code_largest_first_in_line_order():
    items = [{"gtin": f"g{n}", "upc": f"u{n}", "line": n, "round": 1,
              "error": {"code": code, "message": f"m{n}"}} for n, code in
             [(5, "rejected"), (2, "rejected"), (3, "timeout"), (9, "rejected"), (1, None)]]
    groups = cv.failure_groups(items, shown=2)
    assert [(g.code, g.count, g.more) for g in groups] == [("rejected", 3, 1), ("timeout", 1, 0), ("unknown", 1, 0)]
    assert [r["line"] for r in groups[0].rows] == [2, 5] and groups[0].rows[0]["message"] == "m2"


def test_stall_history_keeps_the_sweepers_events_only():
    events = [{"type": "created", "actor": "http", "at": _iso(0), "details": {}},
              {"type": "stall_flagged", "actor": "sweeper", "at": _iso(60), "details": {"kind": "no_progress"}},
              {"type": "stall_recovered", "actor": "sweeper", "at": _iso(120), "details": {"how": "moved"}}]
    assert [e.type for e in cv.stall_history(events)] == ["stall_flagged", "stall_recovered"]
    assert cv.stall_history(events)[0].details == "kind: no_progress"


def test_actions_offered_by_status_with_counts_in_their_confirmation():
    running = {a.name: a for a in cv.actions(_view())}
    assert set(running) == {"pause", "redrive", "cancel"}
    assert running["cancel"].count == 5 and "5 open items" in running["cancel"].confirm and running["cancel"].danger
    paused = {a.name for a in cv.actions(_view(status="paused"))}
    assert paused == {"resume", "redrive", "cancel"}
    done = {a.name: a for a in cv.actions(_view(status="completed_with_failures",
                                               counts={"failed": 1, "succeeded": 9}))}
    assert set(done) == {"retry-failed"} and "1 failed item " in done["retry-failed"].confirm
    assert cv.actions(_view(status="completed")) == []


def test_list_filters_round_trip_through_the_query_string():
    f = cv.list_filters({"status": "running", "gcs_path": " gs://b/x y.csv ", "cursor": ""})
    assert f == cv.ListFilters("running", "gs://b/x y.csv", None)
    assert f.query(cursor="abc") == "status=running&gcs_path=gs%3A%2F%2Fb%2Fx+y.csv&cursor=abc"
    assert f.query(status=None) == "gcs_path=gs%3A%2F%2Fb%2Fx+y.csv"


def test_job_page_url():
    assert cv.job_page_url("http://127.0.0.1:8765/", "a b") == "http://127.0.0.1:8765/jobs/a%20b"
    assert cv.job_page_url("", "j") == ""
