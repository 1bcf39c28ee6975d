"""`upcfan redrive JOB [--dry-run] [--yes]` over a fake core: the list first, a confirmation, exit codes."""

from __future__ import annotations

import json
import os

import pytest
from rich.console import Console
from typer.testing import CliRunner

from shared import operations
from shared.exceptions import ConflictError
from upcfan_cli import main as cli

runner = CliRunner()

ROW = {"gtin": "00000000000017", "line": 4, "upc": "0000000000017", "status": "queued", "round": 1,
       "task_name": "ab12-j1-00000000000017-r1", "reason": "queued_without_task",
       "why": "queued, and its task ab12-j1-00000000000017-r1 no longer exists"}


class FakeRedrive:
    """Two pages of stranded items; a real run answers what the core would (new names, outcomes)."""

    def __init__(self, rows=(ROW,), refuse: str | None = None):
        self.rows = [dict(r) for r in rows]
        self.refuse = refuse
        self.calls: list[tuple] = []

    def __call__(self, job_id, actor, *, dry_run, limit=1000, cursor=None):
        self.calls.append((job_id, dry_run, cursor))
        if self.refuse:
            raise ConflictError(self.refuse, code="job_finished")
        page, nxt = (self.rows[:1], "c1") if cursor is None and len(self.rows) > 1 else (
            self.rows[1:] if cursor else self.rows, None)
        out = {"job_id": job_id, "dry_run": dry_run, "redrive": None, "items": [dict(r) for r in page],
               "tasks_created": 0, "already_enqueued": 0, "moved_meanwhile": 0, "tasks_failed": 0,
               "next_cursor": nxt}
        if not dry_run and page:
            out["redrive"] = len([c for c in self.calls if not c[1]])
            for r in out["items"]:
                r["new_task_name"], r["outcome"] = r["task_name"] + f"-d{out['redrive']}", "created"
            out["tasks_created"] = len(page)
        return out


@pytest.fixture(autouse=True)
def restore_environ():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    from shared.clients import reset_clients

    reset_clients()


@pytest.fixture
def settings_file(tmp_path, monkeypatch):
    env = tmp_path / "stack.env"
    env.write_text("GOOGLE_CLOUD_PROJECT=demo-cli-test\nUPCFAN_LOCATION=us-central1\n"
                   "CLOUD_TASKS_EMULATOR_HOST=127.0.0.1:1\nUPCFAN_INGEST_URL=http://127.0.0.1:2\n"
                   "UPCFAN_WORKER_URL=http://127.0.0.1:3\nUPCFAN_DEFAULT_HANDLER=dry_run\n")
    monkeypatch.setenv("UPCFAN_ENV_FILE", str(env))


def use(monkeypatch, fake: FakeRedrive) -> FakeRedrive:
    monkeypatch.setattr(operations, "redrive_job", fake)
    monkeypatch.setattr(cli, "console", Console(width=250))  # whole rows, so the test reads them
    return fake


def test_dry_run_lists_every_page_and_changes_nothing(monkeypatch, settings_file):
    second = {**ROW, "gtin": "00000000000024", "line": 9, "status": "processing"}
    fake = use(monkeypatch, FakeRedrive([ROW, second]))
    result = runner.invoke(cli.app, ["redrive", "j1", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "2 stranded open item(s)" in result.output and "00000000000017" in result.output
    assert "00000000000024" in result.output and "no longer exists" in result.output
    assert "dry run: nothing changed" in result.output
    assert fake.calls == [("j1", True, None), ("j1", True, "c1")]


def test_asks_before_redriving_and_a_no_changes_nothing(monkeypatch, settings_file):
    fake = use(monkeypatch, FakeRedrive())
    result = runner.invoke(cli.app, ["redrive", "j1"], input="n\n")
    assert result.exit_code == 1 and "not confirmed" in result.output
    assert all(dry for _, dry, _ in fake.calls)

    result = runner.invoke(cli.app, ["redrive", "j1"], input="y\n")
    assert result.exit_code == 0, result.output
    assert "Create a new task for each of these 1 item(s)?" in result.output
    assert "1 tasks created" in result.output and "-d1" in result.output
    assert [dry for _, dry, _ in fake.calls][-2:] == [True, False]


def test_yes_skips_the_question_and_json_reports_totals(monkeypatch, settings_file):
    use(monkeypatch, FakeRedrive())
    result = runner.invoke(cli.app, ["redrive", "j1", "--yes", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["dry_run"] is False and out["redrive"] == [1] and out["tasks_created"] == 1
    assert out["items"][0]["new_task_name"].endswith("-d1")


def test_nothing_stranded_asks_nothing(monkeypatch, settings_file):
    fake = use(monkeypatch, FakeRedrive(rows=()))
    result = runner.invoke(cli.app, ["redrive", "j1"])
    assert result.exit_code == 0 and "nothing to re-drive" in result.output
    assert fake.calls == [("j1", True, None)]


def test_a_finished_job_exits_3(monkeypatch, settings_file):
    use(monkeypatch, FakeRedrive(refuse="job 'j1' is already completed; a finished job is never re-driven"))
    result = runner.invoke(cli.app, ["redrive", "j1", "--yes"])
    assert result.exit_code == 3 and "never re-driven" in result.output


def test_needs_the_task_settings_before_touching_anything(monkeypatch, tmp_path):
    env = tmp_path / "thin.env"
    env.write_text("GOOGLE_CLOUD_PROJECT=demo-cli-test\n")
    fake = use(monkeypatch, FakeRedrive())
    monkeypatch.delenv("UPCFAN_WORKER_URL", raising=False)
    result = runner.invoke(cli.app, ["--env-file", str(env), "redrive", "j1", "--dry-run"])
    assert result.exit_code == 1 and "redrive needs settings" in result.output
    assert fake.calls == []
