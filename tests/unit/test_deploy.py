"""scripts/deploy --dry-run: builds locally, prints every command, runs none; the printed
gcloud commands keep invokers authenticated, name service accounts, size timeouts to the
queues' dispatch deadlines and pass the Slack URL only as a secret reference; the order puts the
secret values check before any function deploy; the mode of dropped files is a required setting."""

from __future__ import annotations

import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infra import deploy, model
from shared.config import CONTROL_QUEUE, ITEM_QUEUE

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "deploy"

MAIN = '''import functions_framework
from flask import jsonify

from shared.config import settings


@functions_framework.http
def {fn}(request):
    return jsonify({{"fn": "{fn}", "project": settings().project}})
'''


@pytest.fixture()
def source_root(tmp_path):
    root = tmp_path / "src"
    (root / "functions").mkdir(parents=True)
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    shutil.copytree(REPO / "shared", root / "shared", ignore=shutil.ignore_patterns("__pycache__"))
    for fn in model.FUNCTIONS:
        (root / "functions" / fn).mkdir()
        (root / "functions" / fn / "main.py").write_text(MAIN.format(fn=fn))
    return root


def run_dry(source_root: Path, tmp_path: Path, *extra: str, default_handler: str = "dry_run",
            expect_rc: int = 0) -> tuple[str, Path]:
    # A gcloud on PATH that leaves a marker if anything ever runs it.
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    marker = tmp_path / "gcloud-was-run"
    fake = bindir / "gcloud"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "UPCFAN_PYTHON": sys.executable,
           "UPCFAN_CONFIG_DIR": str(tmp_path / "config")}
    env.pop("UPCFAN_ITEM_QUEUE_SHARDS", None)
    proc = subprocess.run(
        [str(SCRIPT), "--project", "demo-prod", "--region", "us-central1", "--bucket", "upcfan-drop",
         "--source-root", str(source_root), "--build-dir", str(tmp_path / "build"), "--dry-run",
         *(["--default-handler", default_handler] if default_handler else []), *extra],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == expect_rc, proc.stderr
    if expect_rc:
        return proc.stderr, tmp_path / "build"
    assert not marker.exists(), "dry run executed gcloud"
    return proc.stdout, tmp_path / "build"


def deploy_commands(out: str) -> dict[str, dict[str, str]]:
    cmds = {}
    for line in out.splitlines():
        if line.startswith("DRY-RUN gcloud functions deploy"):
            argv = shlex.split(line.removeprefix("DRY-RUN "))
            flags = {}
            for a in argv[4:]:
                k, _, v = a.partition("=")
                flags[k] = v
            cmds[argv[3]] = flags
    return cmds


def test_script_is_executable():
    assert os.access(SCRIPT, os.X_OK)


def test_dry_run_prints_every_command_in_order_and_runs_none(source_root, tmp_path):
    out, build = run_dry(source_root, tmp_path, "--item-queue-shards", "4")
    lines = [l for l in out.splitlines() if l.startswith("DRY-RUN ")]
    # infra apply (before), the secret values check, 4 deploys, infra apply (after)
    assert len(lines) == 7
    assert "-m infra apply" in lines[0] and "--before-deploy" in lines[0]
    assert "-m infra secrets" in lines[1] and f"--functions={','.join(model.FUNCTIONS)}" in lines[1]
    assert all("gcloud functions deploy" in l for l in lines[2:6])
    assert "-m infra apply" in lines[-1] and "--before-deploy" not in lines[-1]
    assert set(deploy_commands(out)) == set(model.FUNCTIONS)


def test_order_secret_containers_then_values_then_functions_then_grants():
    """The first deploy: containers exist (apply --before-deploy) and every mounted secret has a
    value (or deploy stops, naming it) before the first `--set-secrets ...:latest` deploy."""
    steps = []

    def fake_run(cmd, check, cwd):
        steps.append(cmd)
        if "secrets" in cmd:
            raise subprocess.CalledProcessError(1, cmd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(deploy.subprocess, "run", fake_run)
        mp.setattr(deploy, "build", lambda *a: pytest.fail("built a function before the secrets check"))
        with pytest.raises(SystemExit, match="secret values check, before any function deploy"):
            deploy.main(["--project", "p", "--region", "r", "--default-handler", "dry_run"])
    assert [c[3] for c in steps] == ["apply", "secrets"] and "--before-deploy" in steps[0]


def test_dry_run_prints_each_functions_env_and_secrets(source_root, tmp_path):
    out, _ = run_dry(source_root, tmp_path)
    d = model.Desired(project="demo-prod", region="us-central1")
    for fn in model.FUNCTIONS:
        block = out.split(f"function {fn}: service account {d.sa_email(fn)}", 1)[1].split("DRY-RUN", 1)[0]
        assert "  env UPCFAN_DEFAULT_HANDLER=dry_run" in block and "  env GOOGLE_CLOUD_PROJECT=demo-prod" in block
        for var, secret in model.FUNCTION_SECRETS[fn]:
            assert f"  secret {var} <- {secret}:latest" in block


def test_mode_of_dropped_files_is_a_required_printed_setting(source_root, tmp_path):
    err, _ = run_dry(source_root, tmp_path, default_handler="", expect_rc=2)
    assert "--default-handler" in err
    out, _ = run_dry(source_root, tmp_path)
    assert out.splitlines()[0] == "dropped files run: dry_run (DRY RUN: items are checked, nothing is sent to the marketplace)"
    for flags in deploy_commands(out).values():
        assert "UPCFAN_DEFAULT_HANDLER=dry_run" in flags["--set-env-vars"]
    err, _ = run_dry(source_root, tmp_path, default_handler="marketplace_draft", expect_rc=1)
    assert "give --marketplace-url" in err
    out, _ = run_dry(source_root, tmp_path, "--marketplace-url", "https://mp.example.invalid",
                     default_handler="marketplace_draft")
    assert "dropped files run: marketplace_draft (LIVE" in out
    err, _ = run_dry(source_root, tmp_path, default_handler="nonsense", expect_rc=2)
    assert "invalid choice" in err


def test_deploys_are_authenticated_with_dedicated_service_accounts(source_root, tmp_path):
    out, _ = run_dry(source_root, tmp_path)
    assert "--allow-unauthenticated" not in out.replace("--no-allow-unauthenticated", "")
    d = model.Desired(project="demo-prod", region="us-central1")
    for fn, flags in deploy_commands(out).items():
        assert "--no-allow-unauthenticated" in flags
        assert "--gen2" in flags and flags["--runtime"] == "python311" and "--trigger-http" in flags
        assert flags["--entry-point"] == fn
        assert flags["--service-account"] == d.sa_email(fn)


def test_timeouts_cover_dispatch_deadlines_and_capacity_covers_queues(source_root, tmp_path):
    for shards in (1, 4):
        out, _ = run_dry(source_root, tmp_path, "--item-queue-shards", str(shards))
        cmds = deploy_commands(out)
        t = {fn: int(f["--timeout"].rstrip("s")) for fn, f in cmds.items()}
        assert t["worker"] == ITEM_QUEUE.dispatch_deadline_s
        assert t["ingest"] == CONTROL_QUEUE.dispatch_deadline_s
        w = cmds["worker"]
        capacity = int(w["--max-instances"]) * int(w["--concurrency"])
        assert capacity >= shards * ITEM_QUEUE.rate.max_concurrent_dispatches + CONTROL_QUEUE.rate.max_concurrent_dispatches
        i = cmds["ingest"]
        assert int(i["--max-instances"]) * int(i["--concurrency"]) >= CONTROL_QUEUE.rate.max_concurrent_dispatches
        assert f"UPCFAN_ITEM_QUEUE_SHARDS={shards}" in w["--set-env-vars"]
        assert cmds["sweeper"]["--max-instances"] == "1"


def _env_of(flags: dict[str, str]) -> dict[str, str]:
    body = flags["--set-env-vars"]
    sep = "@" if body.startswith("^@^") else ","
    return dict(kv.split("=", 1) for kv in body.removeprefix("^@^").split(sep))


def _local_functions_env() -> dict[str, dict[str, str]]:
    from devstack import stack

    plan = stack._Plan(ports={name: 1000 + i for i, name in enumerate(stack.PORT_NAMES)},
                       env={"UPCFAN_LOCATION": "us-central1", "FIRESTORE_EMULATOR_HOST": "127.0.0.1:1"},
                       skip=set(), java=Path("/nonexistent"), sdk_root=None,
                       secrets={"UPCFAN_MARKETPLACE_API_KEY": "k", "UPCFAN_SLACK_WEBHOOK_URL": "http://127.0.0.1:2"})
    return {c.name: c.env for c in stack._functions(plan)}


def test_threads_are_set_to_concurrency_and_the_local_stack_runs_the_same(source_root, tmp_path):
    """Unset, functions-framework runs CPUs x 4 gunicorn threads whatever --concurrency says."""
    out, _ = run_dry(source_root, tmp_path)
    deployed = {fn: _env_of(flags)["THREADS"] for fn, flags in deploy_commands(out).items()}
    assert deployed == {fn: flags["--concurrency"] for fn, flags in deploy_commands(out).items()}
    functions = _local_functions_env()
    assert {name: env["THREADS"] for name, env in functions.items()} == deployed
    # and the secrets deploy mounts, with the local value: the marketplace key on the worker only
    assert {name for name, env in functions.items() if "UPCFAN_MARKETPLACE_API_KEY" in env} == {"worker"}
    # One local process per function stands for its instances: enough workers to serve what the local
    # queues dispatch at once (ingest: 8 chunk tasks at 4 per instance, where Cloud Run scales out).
    capacity = {name: int(env["WORKERS"]) * int(env["THREADS"]) for name, env in functions.items()}
    assert capacity["ingest"] >= CONTROL_QUEUE.local_max_concurrent_dispatches and functions["ingest"]["WORKERS"] == "2"
    assert capacity["worker"] >= ITEM_QUEUE.local_max_concurrent_dispatches + CONTROL_QUEUE.local_max_concurrent_dispatches
    assert functions["api"]["WORKERS"] == functions["sweeper"]["WORKERS"] == "1"


def test_each_function_runs_locally_with_exactly_the_env_and_secrets_deploy_sets(source_root, tmp_path):
    """One deployment model: a function's local env is its deployed env (`--set-env-vars`) and mounted
    secrets (`--set-secrets`), with the local project's values, plus only the documented local-only
    variables (where the emulators are, the function's identity, instances per process)."""
    from devstack import identity, stack

    out, _ = run_dry(source_root, tmp_path, "--marketplace-url", "https://api.example.invalid",
                     default_handler="marketplace_draft")
    local = _local_functions_env()
    for fn, flags in deploy_commands(out).items():
        deployed = set(_env_of(flags)) | {pair.split("=", 1)[0] for pair in flags["--set-secrets"].split(",")}
        assert set(local[fn]) - set(stack.LOCAL_ONLY_ENV) == deployed, fn
        # the same values where they do not name the project or a URL
        for var in ("THREADS", "UPCFAN_ITEM_QUEUE_NAME", "UPCFAN_CONTROL_QUEUE_NAME", "UPCFAN_ITEM_QUEUE_SHARDS",
                    "UPCFAN_DEFAULT_HANDLER", "UPCFAN_LOCATION"):
            assert local[fn][var] == _env_of(flags)[var], (fn, var)
        # each process runs as its own service account, the one deploy gives the function
        token = identity.claims(local[fn]["UPCFAN_LOCAL_ACCESS_TOKEN"])
        assert token.email == flags["--service-account"].replace("demo-prod", stack.PROJECT), fn
        assert local[fn]["UPCFAN_TASK_SERVICE_ACCOUNT"].startswith(model.SA_IDS["tasks_invoker"] + "@")


def test_slack_url_is_a_secret_reference_never_a_literal(source_root, tmp_path, monkeypatch):
    monkeypatch.setenv("UPCFAN_SLACK_WEBHOOK_URL", "https://example.invalid/services/T000/B000/SECRETVALUE")
    out, _ = run_dry(source_root, tmp_path)
    assert "SECRETVALUE" not in out and "example.invalid" not in out
    cmds = deploy_commands(out)
    # every function sends job notes (worker, ingest, api: job finished; sweeper: stall alerts)
    for fn, flags in cmds.items():
        assert "SLACK" not in flags["--set-env-vars"]
        assert f"UPCFAN_SLACK_WEBHOOK_URL={model.SLACK_SECRET}:latest" in flags["--set-secrets"].split(",")
        assert (model.MARKETPLACE_SECRET in flags["--set-secrets"]) == (fn == "worker")


def test_build_dir_vendors_shared_pins_requirements_and_hash_labels_it(source_root, tmp_path):
    out, build = run_dry(source_root, tmp_path, "--functions", "worker")
    w = build / "worker"
    assert (w / "main.py").read_text() == (source_root / "functions/worker/main.py").read_text()
    assert (w / "shared" / "config.py").exists() and not list(w.rglob("__pycache__"))
    reqs = (w / "requirements.txt").read_text().split()
    pins = deploy.pinned_deps(source_root / "pyproject.toml")
    assert "functions-framework==" + pins["functions-framework"] in reqs
    assert all("==" in r for r in reqs)
    assert not any(r.startswith(("typer", "rich", "pytest")) for r in reqs)  # CLI/dev deps stay out
    digest = deploy.content_hash(w)
    assert f"build worker: {w} sha256:{digest}" in out
    assert f"upcfan-build={digest}" in deploy_commands(out)["worker"]["--update-labels"]
    # same tree, same hash; a source change, a new hash
    out2, _ = run_dry(source_root, tmp_path, "--functions", "worker")
    assert f"sha256:{digest}" in out2
    (source_root / "functions/worker/main.py").write_text(MAIN.format(fn="worker") + "# changed\n")
    out3, _ = run_dry(source_root, tmp_path, "--functions", "worker")
    assert f"sha256:{digest}" not in out3


def test_unknown_third_party_import_fails_the_build(source_root, tmp_path):
    (source_root / "functions/api/main.py").write_text("import leftpad_nonexistent\n")
    with pytest.raises(SystemExit, match="leftpad_nonexistent"):
        deploy.build("api", source_root, tmp_path / "b")


def test_sizing_arithmetic_matches_docs():
    specs = {s.name: s for s in deploy.function_specs(4)}
    # 4 bulk shards of 1000, the small-jobs lane's 200 and the control queue's 20, at 80 per instance
    assert specs["worker"].max_instances == math.ceil((4 * 1000 + 200 + 20) / 80) == 53
    assert specs["ingest"].max_instances == math.ceil(20 / 4) + 2 == 7
    assert {s.name for s in deploy.function_specs(1)} == set(model.FUNCTIONS)


def test_real_tree_builds_for_functions_that_exist(tmp_path):
    present = [fn for fn in model.FUNCTIONS if (REPO / "functions" / fn / "main.py").exists()]
    if not present:
        pytest.skip("no functions/<fn>/main.py in this checkout yet")
    for fn in present:
        out, digest = deploy.build(fn, REPO, tmp_path / "build")
        assert (out / "requirements.txt").read_text().startswith(("cloudevents", "functions-framework"))
        if fn == "api":  # the web console's templates and script ship with the api function
            for name in ("templates/base.html", "templates/jobs.html", "templates/job.html", "assets/console.js",
                         "assets/console.css"):
                assert (out / name).is_file(), name


def test_dry_run_prints_the_profile_it_would_write_and_the_cli_reads_it(source_root, tmp_path, monkeypatch):
    """Issue 14, defect 10: `upcfan --project P` ran with empty settings; deploy now writes what it deployed
    as a profile (here only printed), and the CLI given those lines has every setting retry-failed needs."""
    out, _ = run_dry(source_root, tmp_path, "--marketplace-url", "https://marketplace.example",
                     default_handler="marketplace_draft")
    path = tmp_path / "config" / "profiles" / "demo-prod.env"
    lines = out.splitlines()
    start = lines.index(f"profile (dry run: not written) {path}, for upcfan --project demo-prod:")
    printed = dict(line.strip().split("=", 1) for line in lines[start + 1:] if line.startswith("  "))
    assert not path.exists()
    d = model.from_settings("demo-prod", "us-central1", bucket="upcfan-drop")
    assert printed == deploy.deployment_profile(d, deploy.env_vars(d, "https://marketplace.example",
                                                                    "marketplace_draft"))
    assert printed["UPCFAN_SLACK_WEBHOOK_SECRET"] == "projects/demo-prod/secrets/upcfan-slack-webhook"
    assert not {"UPCFAN_SLACK_WEBHOOK_URL", "UPCFAN_MARKETPLACE_API_KEY"} & set(printed)  # never a secret value

    from shared.envfile import write_env_file
    from shared.required_settings import missing
    from upcfan_cli import main as cli

    profile = tmp_path / "printed.env"
    write_env_file(profile, printed)
    saved = dict(os.environ)
    try:
        for var in [v for v in os.environ if v.endswith(("_EMULATOR_HOST", "_EMULATOR_GRPC_HOST")) or v.startswith("UPCFAN_")]:
            del os.environ[var]
        cli._configure(env_file=None, project="demo-prod", profile=profile)
        from shared.config import settings

        for command, needs in cli.COMMAND_SETTINGS.items():
            assert missing(needs, settings()) == [], command
        assert settings().default_handler == "marketplace_draft" and settings().mode == "live"
    finally:
        os.environ.clear()
        os.environ.update(saved)
        from shared.clients import reset_clients

        reset_clients()


def test_console_url_is_set_on_the_functions_only_when_given():
    d = model.from_settings("demo-prod", "us-central1", bucket="upcfan-drop")
    assert "UPCFAN_CONSOLE_URL" not in deploy.env_vars(d, "", "dry_run")
    assert deploy.env_vars(d, "", "dry_run", "http://127.0.0.1:8765/")["UPCFAN_CONSOLE_URL"] == "http://127.0.0.1:8765"
