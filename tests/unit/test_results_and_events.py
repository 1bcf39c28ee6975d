"""The results manifest (rows, order, escaping, the writer's once-only upload) and the event history
(store paging, operations, API routes), on the in-memory store."""

from __future__ import annotations

import csv
import datetime as dt
import io

import pytest

from shared import operations, results
from shared.events import Event
from shared.exceptions import BadRequestError, NotFoundError
from shared.item_state import Create
from shared.store.memory import MemoryStore

T0 = dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)


def _item(store, job_id, gtin, line, upc, status, *, error=None, offer=None):
    doc = {"gtin": gtin, "upc": upc, "line": line, "status": status, "error": error,
           "result": {"offer_id": offer} if offer else None}
    store.transact_item("seed", job_id, gtin, lambda _: (None, Create(doc)))


@pytest.fixture
def store(monkeypatch):
    """A finished job of 7 lines: 4 items (one failed), 2 invalid lines, 1 duplicate; seeded out of order."""
    db = MemoryStore()
    db.create_job({"job_id": "j1", "status": "completed_with_failures", "round": 1, "fanout_done_at": T0,
                   "gcs_path": "gs://b/f.txt", "created_at": T0,
                   "totals": {"lines": 7, "items": 4, "invalid": 2, "duplicate": 1, "skipped": 1}},
                  Event("created", "cli:alice", T0, {"gcs_path": "gs://b/f.txt"}, event_id="created"))
    _item(db, "j1", "00000000000703", 7, "703", "succeeded", offer="off-7")
    _item(db, "j1", "00000000000017", 1, "017", "succeeded", offer="off-1")
    _item(db, "j1", "00000000000024", 3, "024", "failed",
          error={"code": "marketplace_rejected", "message": 'rejected: "bad", really', "retryable": False})
    _item(db, "j1", "00000000000031", 5, "031", "succeeded", offer="off-5")
    db.write_line_records("j1", [
        {"line": 6, "raw": "=HYPERLINK(\"x\")", "outcome": "invalid", "code": "bad_length", "reason": "6 chars"},
        {"line": 2, "raw": "12,3\n4", "outcome": "invalid", "code": "not_digits", "reason": "has , and newline"},
        {"line": 4, "raw": "017", "outcome": "duplicate", "code": "duplicate_in_file", "gtin": "00000000000017",
         "duplicate_of_line": 1, "reason": "GTIN 00000000000017 already appears on line 1"},
    ])
    monkeypatch.setattr(operations, "_store", lambda: db)
    return db


def _parse(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


@pytest.mark.parametrize("page", [1, 2, 1000])
def test_manifest_has_one_row_per_line_ordered_by_line_whatever_the_page_size(store, page):
    rows = list(results.manifest_rows("j1", store=store, page=page))
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert rows[0] == (1, "017", "00000000000017", "succeeded", "", "", "off-1")
    assert rows[2] == (3, "024", "00000000000024", "failed", "marketplace_rejected", 'rejected: "bad", really', "")
    assert rows[3][:5] == (4, "017", "00000000000017", "duplicate", "duplicate_in_file")
    assert len(rows) == store.get_job("j1").totals["lines"]


def test_csv_quotes_odd_text_and_defuses_formulas(store):
    text = "".join(results.iter_csv("j1", store=store, page=2))
    parsed = _parse(text)
    assert parsed[0] == list(results.COLUMNS)
    by_line = {int(r[0]): r for r in parsed[1:]}
    assert by_line[2][1] == "12,3\n4"  # comma and newline survive a round trip
    assert by_line[3][5] == 'rejected: "bad", really'
    assert by_line[6][1] == "'=HYPERLINK(\"x\")"  # a spreadsheet reads it as text, not a formula
    assert len(parsed) == 1 + 7


def test_write_csv_counts_rows_and_iter_csv_equals_it(store):
    out = io.StringIO()
    n = results.write_csv(out, results.manifest_rows("j1", store=store))
    assert n == 7 and out.getvalue() == "".join(results.iter_csv("j1", store=store, page=3))


def test_results_paths_per_round():
    assert results.results_object_name("j1") == "results/j1.csv"
    assert results.results_object_name("j1", 2) == "results/j1.r2.csv"


class _FakeBlob:
    def __init__(self, objects, name):
        self.objects, self.name = objects, name

    def exists(self):
        return self.name in self.objects

    def open(self, mode, **kwargs):
        blob = self

        class _W(io.StringIO):
            def close(self):
                if "w" in mode:
                    assert kwargs.get("if_generation_match") == 0  # create only, never overwrite
                    blob.objects[blob.name] = self.getvalue()
                super().close()

        return _W() if "w" in mode else io.StringIO(self.objects[self.name])


class _FakeClient:
    def __init__(self):
        self.objects: dict[str, str] = {}

    def bucket(self, name):
        client = self

        class _B:
            def blob(self, obj):
                return _FakeBlob(client.objects, f"{name}/{obj}")

        return _B()


def test_write_results_uploads_once_and_records_path_and_event(store, monkeypatch):
    from shared import clients
    from shared.config import settings

    monkeypatch.setenv("UPCFAN_BUCKET", "bkt")
    settings.cache_clear()
    fake = _FakeClient()
    monkeypatch.setattr(clients, "storage_client", lambda: fake)
    try:
        first = results.write_results("j1", 1, store=store, now=T0)
        assert first["status"] == "written" and first["rows"] == 7 and first["lines_missing"] == 0
        assert first["path"] == "gs://bkt/results/j1.csv"
        assert _parse(fake.objects["bkt/results/j1.csv"])[1][0] == "1"
        # A redelivered task finds it recorded; one whose record was lost finds the object and counts it.
        assert results.write_results("j1", 1, store=store)["status"] == "already_written"
        store.update_job("j1", {"results": None})
        again = results.write_results("j1", 1, store=store, now=T0)
        assert again["status"] == "already_written" and again["rows"] == 7
    finally:
        settings.cache_clear()
    assert operations.get_job_status("j1")["results"]["path"] == "gs://bkt/results/j1.csv"
    written = [e for e in operations.list_events("j1")["events"] if e["type"] == "results_written"]
    assert len(written) == 1 and written[0]["actor"] == "ingest" and written[0]["details"]["rows"] == 7


def test_a_manifest_task_of_an_earlier_round_or_an_unfinished_job_writes_nothing(store, monkeypatch):
    from shared import clients

    fake = _FakeClient()
    monkeypatch.setattr(clients, "storage_client", lambda: fake)
    store.update_job("j1", {"round": 2, "status": "running"})
    assert results.write_results("j1", 1, store=store)["status"] == "superseded"
    assert results.write_results("j1", 2, store=store)["status"] == "superseded"
    assert fake.objects == {} and "results" not in store.jobs["j1"]


def test_missing_line_records_are_counted_not_invented(store, monkeypatch):
    from shared import clients
    from shared.config import settings

    store.update_job("j1", {"totals": {"lines": 9, "items": 4, "invalid": 4, "duplicate": 1}})
    monkeypatch.setenv("UPCFAN_BUCKET", "bkt")
    settings.cache_clear()
    monkeypatch.setattr(clients, "storage_client", lambda: _FakeClient())
    try:
        out = results.write_results("j1", 1, store=store)
    finally:
        settings.cache_clear()
    assert out["rows"] == 7 and out["lines_missing"] == 2


# ---------------------------------------------------------------- events


def test_events_page_oldest_first_with_a_cursor(store):
    for n, (type_, actor) in enumerate([("planned", "ingest"), ("fanout_done", "ingest"), ("cancelled", "cli:bob"),
                                        ("completed", "progress_check")], 1):
        store.record_event("j1", Event(type_, actor, T0 + dt.timedelta(seconds=n), {"n": n}))
    first = operations.list_events("j1", limit=2)
    assert [e["type"] for e in first["events"]] == ["created", "planned"]
    assert first["events"][0]["actor"] == "cli:alice" and first["events"][0]["at"] == "2026-01-02T00:00:00Z"
    rest = operations.list_events("j1", limit=10, cursor=first["next_cursor"])
    assert [(e["type"], e["actor"]) for e in rest["events"]] == [
        ("fanout_done", "ingest"), ("cancelled", "cli:bob"), ("completed", "progress_check")]
    assert rest["next_cursor"] is None


def test_events_refuse_unknown_jobs_and_cursors(store):
    with pytest.raises(NotFoundError):
        operations.list_events("nope")
    with pytest.raises(BadRequestError, match="names no event"):
        operations.list_events("j1", cursor="not-an-event")
    with pytest.raises(BadRequestError):
        operations.list_events("j1", limit=0)


def test_api_routes_for_events_and_results_csv(store):
    from deployed_env import create_function_app

    client = create_function_app("api").test_client()
    resp = client.get("/api/batch/jobs/j1/events?limit=1")
    assert resp.status_code == 200 and resp.get_json()["events"][0]["type"] == "created"
    assert client.get("/api/batch/jobs/j1/events?limit=0").status_code == 400
    assert client.get("/api/batch/jobs/nope/events").status_code == 404
    resp = client.get("/api/batch/jobs/j1/results.csv")
    assert resp.status_code == 200 and resp.mimetype == "text/csv"
    assert resp.get_data(as_text=True) == "".join(results.iter_csv("j1", store=store))
    assert client.get("/api/batch/jobs/nope/results.csv").status_code == 404


def test_cli_events_and_export(store, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from upcfan_cli import main as cli

    monkeypatch.setattr(cli, "_require", lambda command: None)
    runner = CliRunner()
    out = tmp_path / "r.csv"
    result = runner.invoke(cli.app, ["export", "j1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text() == "".join(results.iter_csv("j1", store=store))
    result = runner.invoke(cli.app, ["events", "j1", "--json"])
    assert result.exit_code == 0 and '"created"' in result.output and "cli:alice" in result.output
    assert runner.invoke(cli.app, ["export", "nope"]).exit_code == cli.EXIT_NOT_FOUND


def test_status_view_names_the_results_manifest():
    from rich.console import Console

    from upcfan_cli import main as cli

    view = {"job_id": "j1", "status": "completed", "final": True, "round": 1, "counts": {}, "totals": {},
            "results": {"path": "gs://b/results/j1.csv", "rows": 7, "lines_missing": 2}}
    console = Console(width=200, record=True)
    console.print(cli.render_status(view))
    assert "results: gs://b/results/j1.csv (7 rows, 2 line(s) without a record)" in console.export_text()
