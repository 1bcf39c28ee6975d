"""`upcfan` CLI: exit codes, env loading, output formats and the live --watch view, over a fake core."""

from __future__ import annotations

import csv
import io
import json
import os

import pytest
from rich.console import Console
from typer.testing import CliRunner

from shared import operations
from shared.exceptions import ConflictError, NotFoundError
from upcfan_cli import main as cli

runner = CliRunner()


def _view(status="running", succeeded=0, failed=0, queued=0, items=10, final=False, stall=None):
    counts = {"queued": queued, "processing": 0, "succeeded": succeeded, "failed": failed, "cancelled": 0,
              "never_claimed": max(0, items - succeeded - failed - queued)}
    done = succeeded + failed
    return {"job_id": "j1", "status": status, "final": final, "round": 1,
            "totals": {"lines": items + 2, "items": items, "invalid": 1, "duplicate": 1},
            "counts": counts, "percent": 100.0 * done / items, "rate_items_per_s": 2.5,
            "eta_s": (items - done) / 2.5, "stalled": bool(stall), "stall": stall,
            "fanout_done_at": "2026-01-01T00:00:00Z",
            "outcome": {"lines": items + 2, "succeeded": succeeded, "failed": failed, "invalid": 1, "duplicate": 1,
                        "cancelled": 0, "pending": items - done}}


class FakeCore:
    def __init__(self, views=None):
        self.views = list(views or [])
        self.calls = []

    def get_job_status(self, job_id, now=None):
        self.calls.append(("status", job_id))
        if job_id == "missing":
            raise NotFoundError("job 'missing' not found")
        return self.views.pop(0) if len(self.views) > 1 else self.views[0]

    def cancel_job(self, job_id, actor):
        self.calls.append(("cancel", job_id, actor))
        if job_id == "done":
            raise ConflictError("job 'done' is already completed; a finished job cannot be cancelled")
        return {"job_id": job_id, "status": "cancelled", "already_cancelled": False, "items_cancelled": 3}

    def pause_job(self, job_id, actor, reason=None):
        self.calls.append(("pause", job_id, actor, reason))
        if job_id == "done":
            raise ConflictError("job 'done' is already completed; only a running or ingesting job can be paused")
        return {"job_id": job_id, "status": "paused", "already_paused": job_id == "p1"}

    def resume_job(self, job_id, actor):
        self.calls.append(("resume", job_id, actor))
        return {"job_id": job_id, "status": "running", "already_running": False}

    def retry_failed(self, job_id, actor):
        self.calls.append(("retry", job_id, actor))
        if job_id == "busy":
            raise ConflictError("job 'busy' is still running; retry-failed runs only after the job has finished")
        return {"job_id": job_id, "round": 2, "resumed": False, "items_requeued": 4, "tasks_created": 4}

    def list_jobs(self, limit, status, gcs_path, cursor):
        self.calls.append(("jobs", limit, status, gcs_path, cursor))
        return {"jobs": [{"job_id": "j1", "status": "running", "round": 1, "totals": {"lines": 3, "items": 2},
                          "counts": {}, "created_at": "2026-01-01T00:00:00Z", "gcs_path": "gs://b/f.txt"}],
                "next_cursor": None}

    def list_items(self, job_id, status, limit, cursor):
        self.calls.append(("items", job_id, status, limit, cursor))
        if status == "invalid":
            return {"kind": "lines", "items": [{"line": 4, "raw": "123", "outcome": "invalid", "code": "bad_length",
                                                "reason": "3 digits"}], "next_cursor": None}
        page = [{"gtin": f"0000000000000{i}", "upc": "x", "line": i, "status": "failed", "round": 1, "attempt": 8,
                 "error": {"code": "marketplace_rejected", "message": "rejected, with a comma"}}
                for i in ((1, 2) if cursor is None else (3,))]
        return {"kind": "items", "items": page, "next_cursor": "c1" if cursor is None else None}

    def submit(self, request, source="http"):
        gcs_path = request.gcs_path
        self.calls.append(("submit", gcs_path, request.handler, request.create_drafts, request.test_mode, source))
        if gcs_path.endswith("gone.txt"):
            from shared.exceptions import SourceObjectNotFoundError

            raise SourceObjectNotFoundError(f"{gcs_path} does not exist")
        return type("R", (), {"job_id": "f-1", "created": True, "status": "ingesting"})()


@pytest.fixture(autouse=True)
def restore_environ():
    """The CLI loads env files into os.environ (as it must); no test leaves them behind."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    from shared.clients import reset_clients

    reset_clients()


@pytest.fixture
def core(monkeypatch, tmp_path):
    fake = FakeCore([_view()])
    for name in ("get_job_status", "cancel_job", "retry_failed", "list_jobs", "list_items", "submit", "pause_job",
                 "resume_job"):
        monkeypatch.setattr(operations, name, getattr(fake, name))
    monkeypatch.setattr(cli, "_sleep", lambda s: None)
    env = tmp_path / "stack.env"
    env.write_text("GOOGLE_CLOUD_PROJECT=demo-cli-test\nUPCFAN_LOCATION=us-central1\n"
                   "CLOUD_TASKS_EMULATOR_HOST=127.0.0.1:1\nUPCFAN_INGEST_URL=http://127.0.0.1:2\n"
                   "UPCFAN_WORKER_URL=http://127.0.0.1:3\nUPCFAN_DEFAULT_HANDLER=dry_run\n")
    monkeypatch.setenv("UPCFAN_ENV_FILE", str(env))
    return fake


@pytest.mark.parametrize("status,code", [("running", 0), ("completed", 0), ("completed_with_failures", 4),
                                         ("failed", 5), ("cancelled", 5)])
def test_status_exit_code_follows_job(core, status, code):
    core.views = [_view(status, succeeded=5, final=status != "running")]
    result = runner.invoke(cli.app, ["status", "j1", "--json"])
    assert result.exit_code == code, result.output
    assert json.loads(result.output)["status"] == status


def test_not_found_conflict_and_usage_exit_codes(core):
    assert runner.invoke(cli.app, ["status", "missing"]).exit_code == 2
    result = runner.invoke(cli.app, ["retry-failed", "busy"])
    assert result.exit_code == 3 and "still running" in result.output
    assert runner.invoke(cli.app, ["cancel", "done"]).exit_code == 3
    assert runner.invoke(cli.app, ["status"]).exit_code == 1  # missing argument
    assert runner.invoke(cli.app, ["no-such-command"]).exit_code == 1
    assert runner.invoke(cli.app, ["jobs", "--limit", "0"]).exit_code == 1
    assert runner.invoke(cli.app, ["submit", "gs://bkt/gone.txt"]).exit_code == 2


def test_unexpected_error_exits_1(core, monkeypatch):
    def boom(job_id, now=None):
        raise RuntimeError("firestore down")

    monkeypatch.setattr(operations, "get_job_status", boom)
    result = runner.invoke(cli.app, ["status", "j1"])
    assert result.exit_code == 1 and "firestore down" in result.output


def test_help_documents_exit_codes():
    result = runner.invoke(cli.app, ["--help"])
    assert result.exit_code == 0
    for line in ("job (or source file) not found", "refused: conflict", "completed_with_failures", "cancelled"):
        assert line in result.output


def test_env_file_is_loaded(core, monkeypatch, tmp_path):
    env = tmp_path / "other.env"
    env.write_text("# local stack\nexport UPCFAN_TEST_MARKER='from-file'\n\nGOOGLE_CLOUD_PROJECT=demo-x\n")
    monkeypatch.delenv("UPCFAN_TEST_MARKER", raising=False)
    result = runner.invoke(cli.app, ["--env-file", str(env), "jobs", "--json"])
    assert result.exit_code == 0, result.output
    assert os.environ["UPCFAN_TEST_MARKER"] == "from-file"
    assert runner.invoke(cli.app, ["--env-file", str(tmp_path / "nope.env"), "jobs"]).exit_code == 1


def test_project_flag_selects_production_project(core, monkeypatch):
    monkeypatch.delenv("UPCFAN_ENV_FILE")
    result = runner.invoke(cli.app, ["--project", "prod-123", "jobs", "--json"])
    assert result.exit_code == 0
    assert os.environ["GOOGLE_CLOUD_PROJECT"] == "prod-123"


def test_cancel_and_retry_report_actor_and_result(core):
    result = runner.invoke(cli.app, ["cancel", "j1"])
    assert result.exit_code == 0 and "3 queued items cancelled" in result.output
    assert core.calls[-1][2].startswith("cli")
    result = runner.invoke(cli.app, ["retry-failed", "j1"])
    assert result.exit_code == 0 and "retry round 2 started" in result.output


def test_pause_and_resume(core):
    result = runner.invoke(cli.app, ["pause", "j1", "--reason", "maintenance"])
    assert result.exit_code == 0 and "job j1 paused" in result.output and "upcfan resume j1" in result.output
    assert core.calls[-1][:2] == ("pause", "j1") and core.calls[-1][3] == "maintenance"
    assert core.calls[-1][2].startswith("cli")
    assert "already paused" in runner.invoke(cli.app, ["pause", "p1"]).output
    assert runner.invoke(cli.app, ["pause", "done"]).exit_code == 3
    result = runner.invoke(cli.app, ["resume", "j1"])
    assert result.exit_code == 0 and "resumed (running)" in result.output


def test_status_of_a_paused_job_says_why_and_what_to_do(core):
    core.views = [{**_view("paused"), "pause": {"code": "marketplace_unauthorized", "message": "401 from catalog"}}]
    result = runner.invoke(cli.app, ["status", "j1"])
    assert result.exit_code == 0
    assert "PAUSED (marketplace_unauthorized)" in result.output and "upcfan resume j1" in result.output


def test_items_csv_follows_cursor_and_quotes(core):
    result = runner.invoke(cli.app, ["items", "j1", "--status", "failed", "--csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.output)))
    assert rows[0] == ["gtin", "upc", "line", "status", "round", "attempt", "error_code", "error_message"]
    assert len(rows) == 4 and rows[1][-1] == "rejected, with a comma"
    assert [c[4] for c in core.calls if c[0] == "items"] == [None, "c1"]


def test_items_invalid_lines_csv(core):
    result = runner.invoke(cli.app, ["items", "j1", "--status", "invalid", "--csv"])
    rows = list(csv.reader(io.StringIO(result.output)))
    assert rows[0][:3] == ["line", "raw", "outcome"] and rows[1][4] == "3 digits"


def test_jobs_table(core):
    result = runner.invoke(cli.app, ["jobs", "--status", "running", "--limit", "5"])
    assert result.exit_code == 0 and "j1" in result.output
    assert core.calls[-1] == ("jobs", 5, "running", None, None)


def test_submit_gs_path_uses_core(core):
    result = runner.invoke(cli.app, ["submit", "gs://b-1/f.txt", "--handler", "marketplace_draft"])
    assert result.exit_code == 0 and "f-1" in result.output
    assert core.calls[-1] == ("submit", "gs://b-1/f.txt", "marketplace_draft", None, None, "cli")


def test_submit_still_takes_the_deprecated_flags(core):
    result = runner.invoke(cli.app, ["submit", "gs://b-1/f.txt", "--test-mode"])
    assert result.exit_code == 0 and "f-1" in result.output
    assert core.calls[-1] == ("submit", "gs://b-1/f.txt", None, None, True, "cli")


@pytest.mark.parametrize("args,needle", [(["gs://b-1/f.txt", "--handler", "nope"], "'nope'"),
                                         (["gs://b-1/."], "'.'")])
def test_submit_refuses_what_the_api_refuses(core, args, needle):
    result = runner.invoke(cli.app, ["submit", *args])
    assert result.exit_code == 1 and needle in result.output
    assert not [c for c in core.calls if c[0] == "submit"]


class FakeBlob:
    def __init__(self, uploads: list, name: str):
        self.uploads, self.name, self.metadata, self.generation = uploads, name, None, None

    def upload_from_filename(self, filename, content_type=None):
        self.generation = 7
        self.uploads.append((self.name, self.metadata))


class FakeStorage:
    def __init__(self):
        self.uploads: list = []

    def bucket(self, name):
        return type("B", (), {"blob": lambda _self, blob_name: FakeBlob(self.uploads, blob_name)})()


@pytest.mark.parametrize("flags,metadata", [
    (["--handler", "dry_run"], {"upcfan-handler": "dry_run"}),
    (["--no-create-drafts", "--test-mode"], {"upcfan-create-drafts": "false", "upcfan-test-mode": "true"}),
    ([], None),
])
def test_submit_local_file_carries_the_handler_as_object_metadata(core, monkeypatch, tmp_path, flags, metadata):
    from shared import clients

    from shared import config

    storage = FakeStorage()
    fake_client = lambda: storage  # noqa: E731
    fake_client.cache_clear = lambda: None  # the CLI resets its clients on start
    monkeypatch.setattr(clients, "storage_client", fake_client)
    monkeypatch.setenv("UPCFAN_BUCKET", "upcfan-uploads")
    upcs = tmp_path / "upcs.txt"
    upcs.write_text("036000291452\n")
    try:
        result = runner.invoke(cli.app, ["submit", str(upcs), *flags])
    finally:
        config.settings.cache_clear()  # forget the settings read with this test's bucket
    assert result.exit_code == 0, result.output
    assert storage.uploads == [("upcs.txt", metadata)]


def test_status_watch_records_bar_and_counts(core, monkeypatch):
    """The live view, recorded: a progress bar, the per-status counts, rate, ETA, and the final summary."""
    core.views = [_view(succeeded=2, queued=3), _view(succeeded=6, failed=1, queued=1, stall={"reason": "no progress"}),
                  _view("completed_with_failures", succeeded=9, failed=1, final=True)]
    recorder = Console(record=True, width=100, force_terminal=True, color_system=None)
    monkeypatch.setattr(cli, "console", recorder)

    result = runner.invoke(cli.app, ["status", "j1", "--watch", "--interval", "0.1"])

    assert result.exit_code == 4
    text = recorder.export_text()
    assert "━" in text  # the bar
    assert "succeeded" in text and "never_claimed" in text
    assert "rate 2.5 items/s" in text and "ETA" in text
    assert "100.0%" in text and "10/10 items" in text
    assert "STALLED: no progress" in text
    assert "summary of j1 (completed_with_failures)" in text
    assert len([c for c in core.calls if c[0] == "status"]) == 3


def test_render_status_before_fanout_shows_planning():
    view = _view("ingesting")
    view["fanout_done_at"] = None
    view["percent"] = None
    console = Console(record=True, width=100)
    console.print(cli.render_status(view))
    assert "planning" in console.export_text()


def test_console_needs_the_api_url_and_prints_the_url_it_serves(core, monkeypatch, tmp_path):
    from upcfan_cli import console_proxy

    monkeypatch.delenv("UPCFAN_API_URL", raising=False)
    result = runner.invoke(cli.app, ["console", "--no-browser"])
    assert result.exit_code == 1 and "UPCFAN_API_URL" in result.output

    env = tmp_path / "with-api.env"
    env.write_text("GOOGLE_CLOUD_PROJECT=demo-cli-test\nUPCFAN_API_URL=http://127.0.0.1:4\n"
                   "UPCFAN_OPERATOR_TOKEN=tok\n")
    served, opened = [], []
    monkeypatch.setattr(console_proxy.ConsoleProxy, "serve_forever", lambda self: served.append(self.upstream))
    monkeypatch.setattr("webbrowser.open", lambda url: opened.append(url))
    result = runner.invoke(cli.app, ["--env-file", str(env), "console", "job-1", "--no-browser"])
    assert result.exit_code == 0, result.output
    url = result.output.splitlines()[0]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/jobs/job-1")
    assert served == ["http://127.0.0.1:4"] and opened == []
    result = runner.invoke(cli.app, ["--env-file", str(env), "console"])
    assert result.exit_code == 0 and opened == [result.output.splitlines()[0]]
