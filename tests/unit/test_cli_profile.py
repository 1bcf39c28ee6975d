"""`upcfan --project P` reads the profile scripts/deploy wrote, and every command refuses to run with
settings it lacks (issue 14, defect 10: `upcfan --project P` ran with empty settings, so retry-failed
created tasks with an empty URL and left a half-enqueued round, and sweep retired pending alerts)."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from infra import deploy, model
from shared import operations
from shared.envfile import read_env_file, write_env_file
from upcfan_cli import main as cli

runner = CliRunner()
PROJECT = "demo-prod"


@pytest.fixture(autouse=True)
def production_shell(monkeypatch, tmp_path):
    """An operator's shell: no local stack in sight, a private config dir; os.environ restored after."""
    saved = dict(os.environ)
    for var in list(os.environ):
        if var.endswith(("_EMULATOR_HOST", "_EMULATOR_GRPC_HOST")) or var.startswith("UPCFAN_") or var in ("GOOGLE_CLOUD_PROJECT",
                                                                                  "GCLOUD_PROJECT"):
            del os.environ[var]
    os.environ["UPCFAN_CONFIG_DIR"] = str(tmp_path / "config")
    monkeypatch.chdir(tmp_path)  # no .local/stack.env here ...
    monkeypatch.setattr(cli, "_default_env_file", lambda: None)  # ... nor in the checkout
    yield tmp_path / "config"
    os.environ.clear()
    os.environ.update(saved)
    from shared.clients import reset_clients

    reset_clients()


@pytest.fixture
def calls(monkeypatch):
    """Every core call a command makes (none may happen before a refusal)."""
    seen = []

    def recorder(name, result):
        def call(*args, **kwargs):
            seen.append((name, args))
            return result
        return call

    monkeypatch.setattr(operations, "retry_failed", recorder("retry_failed", {"round": 2, "items_requeued": 1}))
    monkeypatch.setattr(operations, "list_jobs", recorder("list_jobs", {"jobs": [], "next_cursor": None}))
    monkeypatch.setattr(operations, "get_job_status", recorder("get_job_status", {"job_id": "j1", "status": "running"}))
    from shared import sweeper

    monkeypatch.setattr(sweeper, "run_sweep", lambda **kw: seen.append(("run_sweep", kw)) or sweeper.SweepReport())
    return seen


def flat(text: str) -> str:
    """Output without whitespace or panel borders (typer draws usage errors in a wrapped box)."""
    return "".join(c for c in text if not c.isspace() and c not in "│╭╮╰╯─")


def deployed_profile(handler: str = "marketplace_draft") -> dict[str, str]:
    d = model.Desired(project=PROJECT, region="europe-west1", bucket="upcfan-drop", item_queue_shards=4)
    return deploy.deployment_profile(d, deploy.env_vars(d, "https://marketplace.example", handler))


def test_the_profile_deploy_writes_round_trips_into_the_cli(production_shell, calls):
    d = model.Desired(project=PROJECT, region="europe-west1", bucket="upcfan-drop", item_queue_shards=4)
    env = deploy.env_vars(d, "https://marketplace.example", "marketplace_draft")
    path = deploy.write_profile(d, env, dry_run=False)
    assert path == production_shell / "profiles" / f"{PROJECT}.env"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    result = runner.invoke(cli.app, ["--project", PROJECT, "retry-failed", "j1", "--json"])
    assert result.exit_code == 0, result.output
    assert calls == [("retry_failed", ("j1", cli._actor()))]
    from shared.config import settings

    s = settings()
    assert (s.project, s.location, s.item_queue_shards, s.worker_url, s.task_service_account, s.default_handler) == (
        PROJECT, "europe-west1", 4, d.function_url("worker"), d.sa_email("tasks_invoker"), "marketplace_draft")
    assert read_env_file(path) == deployed_profile()


@pytest.mark.parametrize("profile", [None, {"GOOGLE_CLOUD_PROJECT": PROJECT, "UPCFAN_BUCKET": "upcfan-drop"}])
def test_retry_failed_with_an_incomplete_profile_refuses_before_touching_anything(production_shell, calls, profile):
    """Issue 14, defect 10: no task may be created with an empty URL, no round half-enqueued."""
    path = production_shell / "profiles" / f"{PROJECT}.env"
    if profile is not None:
        path.parent.mkdir(parents=True)
        write_env_file(path, profile)
    result = runner.invoke(cli.app, ["--project", PROJECT, "retry-failed", "j1"])
    assert result.exit_code == cli.EXIT_ERROR
    assert calls == []
    out = " ".join(result.output.split())
    assert "retry-failed needs settings that" in out and str(path) in out
    for var in ("UPCFAN_LOCATION", "UPCFAN_WORKER_URL", "UPCFAN_TASK_SERVICE_ACCOUNT", "UPCFAN_ITEM_QUEUE_NAME",
                "UPCFAN_ITEM_QUEUE_SHARDS", "UPCFAN_CONTROL_QUEUE_NAME"):
        assert var in out
    assert f"scripts/deploy --project {PROJECT}" in out
    # what only needs the project still runs
    assert runner.invoke(cli.app, ["--project", PROJECT, "jobs", "--json"]).exit_code == 0


def test_profile_option_and_a_profile_of_another_project(production_shell, calls, tmp_path):
    other = tmp_path / "other.env"
    write_env_file(other, deployed_profile())
    assert runner.invoke(cli.app, ["--profile", str(other), "retry-failed", "j1", "--json"]).exit_code == 0
    result = runner.invoke(cli.app, ["--project", "demo-other", "--profile", str(other), "jobs"])
    assert result.exit_code == cli.EXIT_ERROR and flat("is the profile of project demo-prod") in flat(result.output)
    result = runner.invoke(cli.app, ["--profile", str(tmp_path / "nope.env"), "jobs"])
    assert result.exit_code == cli.EXIT_ERROR and "scripts/deploy" in flat(result.output)


def test_a_bad_value_in_a_profile_is_named(production_shell, calls, tmp_path):
    bad = tmp_path / "bad.env"
    write_env_file(bad, {**deployed_profile(), "UPCFAN_ITEM_QUEUE_SHARDS": "0"})
    result = runner.invoke(cli.app, ["--profile", str(bad), "jobs"])
    assert result.exit_code == cli.EXIT_ERROR and "UPCFAN_ITEM_QUEUE_SHARDS=0" in result.output
    assert calls == []


def test_sweep_without_the_webhook_refuses_and_no_alerts_leaves_them_pending(production_shell, calls, tmp_path):
    """Issue 14, defect 10: sweep from the CLI retired pending alerts as "not configured"."""
    bare = tmp_path / "bare.env"
    write_env_file(bare, {k: v for k, v in deployed_profile().items() if k != "UPCFAN_SLACK_WEBHOOK_SECRET"})
    result = runner.invoke(cli.app, ["--profile", str(bare), "sweep"])
    assert result.exit_code == cli.EXIT_ERROR and calls == []
    assert "--no-alerts" in result.output and "UPCFAN_SLACK_WEBHOOK_URL" in result.output
    result = runner.invoke(cli.app, ["--profile", str(bare), "sweep", "--no-alerts", "--json"])
    assert result.exit_code == 0, result.output
    assert calls == [("run_sweep", {"webhook_url": ""})]  # "": the outbox posts nothing and retires nothing


def test_sweep_reads_the_webhook_from_the_secret_the_profile_names(production_shell, calls, monkeypatch, tmp_path):
    profile = tmp_path / "p.env"
    write_env_file(profile, deployed_profile())
    asked = []
    monkeypatch.setattr(cli, "read_secret", lambda name: asked.append(name) or "https://hooks.example/T/B/x")
    assert runner.invoke(cli.app, ["--profile", str(profile), "sweep", "--json"]).exit_code == 0
    assert asked == [f"projects/{PROJECT}/secrets/upcfan-slack-webhook"]
    assert calls == [("run_sweep", {"webhook_url": "https://hooks.example/T/B/x"})]

    def denied(name):
        raise PermissionError("403 Permission 'secretmanager.versions.access' denied")

    monkeypatch.setattr(cli, "read_secret", denied)
    result = runner.invoke(cli.app, ["--profile", str(profile), "sweep"])
    assert result.exit_code == cli.EXIT_ERROR and "secretAccessor" in " ".join(result.output.split())


@pytest.mark.parametrize("handler,line", [("marketplace_draft", "dropped files: LIVE (default handler "
                                                                "marketplace_draft)"),
                                         ("dry_run", "dropped files: DRY RUN (default handler dry_run)")])
def test_status_shows_the_mode_of_dropped_files(production_shell, calls, tmp_path, handler, line):
    """Issue 14, defect 9: nothing showed that production ran dropped files as a dry run."""
    profile = tmp_path / "p.env"
    write_env_file(profile, deployed_profile(handler))
    result = runner.invoke(cli.app, ["--profile", str(profile), "status", "j1"])
    assert result.exit_code == 0, result.output
    assert line in result.output
    result = runner.invoke(cli.app, ["--profile", str(profile), "status", "j1", "--json"])
    assert json.loads(result.output)["dropped_files"] == {"mode": "live" if handler != "dry_run" else "dry_run",
                                                          "default_handler": handler}
