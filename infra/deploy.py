"""Build and deploy the four gen2 functions from the one source tree (used by scripts/deploy).

For each function: `build/<fn>/` = `functions/<fn>/` (main.py and any sibling modules)
+ a vendored copy of `shared/`
+ `requirements.txt` pinned from pyproject.toml (only the distributions the build's imports
need). The build directory's content hash is printed and set as the `upcfan-build` label.

Sizing (see docs/operations.md, "Function sizing"): every number is derived from the queue
specs in shared/config.py so the functions never throttle what the queues dispatch:
- a function's timeout = the largest dispatch deadline of the task kinds calling it
  (`shared.deadlines.function_timeout_s`): worker = item deadline, ingest = chunk deadline;
- THREADS (gunicorn's threads in functions-framework, default CPUs x 4) = concurrency, set in
  each function's env here and read by the local stack (devstack/stack.py) from the same spec;
- worker max_instances * concurrency >= shards * item max_concurrent + control max_concurrent;
- ingest max_instances * concurrency >= control max_concurrent, plus headroom for events/POSTs.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import math
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from infra import model
from shared.config import CONTROL_QUEUE, ITEM_QUEUE, SMALL_ITEM_QUEUE
from shared.deadlines import function_timeout_s

REPO_ROOT = Path(__file__).resolve().parent.parent

# import name (top level, or google.cloud.<x>) -> distribution in pyproject
MODULE_DISTS = {
    "functions_framework": "functions-framework",
    "google.cloud.firestore": "google-cloud-firestore",
    "google.cloud.firestore_v1": "google-cloud-firestore",
    "google.cloud.tasks_v2": "google-cloud-tasks",
    "google.cloud.tasks": "google-cloud-tasks",
    "google.cloud.storage": "google-cloud-storage",
    "google.cloud.secretmanager": "google-cloud-secret-manager",
    "google.cloud.secretmanager_v1": "google-cloud-secret-manager",
    "google.cloud.pubsub": "google-cloud-pubsub",
    "google.cloud.pubsub_v1": "google-cloud-pubsub",
    "cloudevents": "cloudevents",
    "requests": "requests",
    "stdnum": "python-stdnum",
    "slack_sdk": "slack-sdk",
    "tenacity": "tenacity",
    "pydantic": "pydantic",
    "pydantic_settings": "pydantic-settings",
    "aiohttp": "aiohttp",
    "dotenv": "python-dotenv",
}
# Come with a distribution above (or with the runtime) and need no pin of their own.
TRANSITIVE = {"flask", "werkzeug", "jinja2", "google.api_core", "google.auth", "google.protobuf", "google.rpc",
              "google.iam", "google.cloud.exceptions", "google.oauth2", "proto", "grpc"}
ALWAYS = ("functions-framework",)
LOCAL = {"shared", "functions", "main"}


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    entry_point: str
    service_account_role: str
    memory: str
    cpu: str
    timeout_s: int
    concurrency: int
    min_instances: int
    max_instances: int
    secrets: tuple[tuple[str, str], ...] = ()

    @property
    def threads(self) -> int:
        """functions-framework's THREADS: one request per thread, so an instance serves what Cloud Run
        sends it (`--concurrency`); unset, gunicorn runs CPUs x 4 threads and queues the rest."""
        return self.concurrency

    def env(self) -> dict[str, str]:
        """This function's own env on top of the shared one (deploy and the local stack both use it)."""
        return {"THREADS": str(self.threads)}


def function_specs(shards: int) -> list[FunctionSpec]:
    # The bulk shards and the small-jobs lane all call the worker.
    item_conc = shards * ITEM_QUEUE.rate.max_concurrent_dispatches + SMALL_ITEM_QUEUE.rate.max_concurrent_dispatches
    control_conc = CONTROL_QUEUE.rate.max_concurrent_dispatches
    worker_conc = 80
    ingest_conc = 4
    return [
        FunctionSpec("ingest", "ingest", "ingest", "1Gi", "1", function_timeout_s("ingest"), ingest_conc,
                     0, math.ceil(control_conc / ingest_conc) + 2, secrets=model.FUNCTION_SECRETS["ingest"]),
        FunctionSpec("worker", "worker", "worker", "512Mi", "1", function_timeout_s("worker"), worker_conc,
                     1, math.ceil((item_conc + control_conc) / worker_conc), secrets=model.FUNCTION_SECRETS["worker"]),
        FunctionSpec("sweeper", "sweeper", "sweeper", "512Mi", "1", 300, 1, 0, 1,
                     secrets=model.FUNCTION_SECRETS["sweeper"]),
        FunctionSpec("api", "api", "api", "512Mi", "1", 60, 20, 0, 5, secrets=model.FUNCTION_SECRETS["api"]),
    ]


# ---- build ---------------------------------------------------------------------------------

def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "google.cloud":
                names.update(f"google.cloud.{a.name}" for a in node.names)
    return names


def _dist_for(module: str, local: set[str] = frozenset()) -> str | None:
    """Distribution for an import, None for stdlib/local/transitive; KeyError if unknown."""
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in LOCAL or top in local or top == "__future__":
        return None
    for prefix in sorted(MODULE_DISTS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return MODULE_DISTS[prefix]
    for prefix in TRANSITIVE:
        if module == prefix or module.startswith(prefix + ".") or top == prefix:
            return None
    if module in ("google", "google.cloud"):
        return None
    raise KeyError(module)


def pinned_deps(pyproject: Path) -> dict[str, str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out = {}
    for d in deps:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;]+)", d)
        if not m:
            raise ValueError(f"dependency {d!r} is not pinned with ==")
        out[m.group(1).lower()] = m.group(2)
    return out


def requirements_for(sources: list[Path], pins: dict[str, str], local: set[str] = frozenset()) -> list[str]:
    dists = set(ALWAYS)
    unknown = []
    for src in sources:
        for mod in _imports(src):
            try:
                dist = _dist_for(mod, local)
            except KeyError:
                unknown.append(f"{src}: import {mod}")
                continue
            if dist:
                dists.add(dist)
    if unknown:
        raise SystemExit("deploy: imports with no known distribution (add to infra/deploy.py MODULE_DISTS):\n  "
                         + "\n  ".join(sorted(unknown)))
    missing = sorted(d for d in dists if d not in pins)
    if missing:
        raise SystemExit(f"deploy: {missing} are imported but not pinned in pyproject.toml")
    return [f"{d}=={pins[d]}" for d in sorted(dists)]


def content_hash(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(directory).as_posix().encode() + b"\0")
            h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build(fn: str, source_root: Path, build_root: Path) -> tuple[Path, str]:
    main = source_root / "functions" / fn / "main.py"
    if not main.exists():
        raise SystemExit(f"deploy: {main} does not exist")
    out = build_root / fn
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "requirements.txt")
    # main.py and its sibling modules (e.g. functions/api/api_schemas.py), then shared/
    shutil.copytree(main.parent, out, ignore=skip, dirs_exist_ok=True)
    shutil.copytree(source_root / "shared", out / "shared", ignore=skip)
    local = {p.stem for p in main.parent.glob("*.py")} | {p.name for p in main.parent.iterdir() if p.is_dir()}
    sources = sorted(out.rglob("*.py"))
    reqs = requirements_for(sources, pinned_deps(source_root / "pyproject.toml"), local)
    (out / "requirements.txt").write_text("\n".join(reqs) + "\n")
    return out, content_hash(out)


# ---- commands ------------------------------------------------------------------------------

def env_vars(d: model.Desired, marketplace_url: str, default_handler: str, console_url: str = "") -> dict[str, str]:
    env = {
        "GOOGLE_CLOUD_PROJECT": d.project,
        "UPCFAN_LOCATION": d.region,
        "UPCFAN_ITEM_QUEUE_NAME": d.item_queue.name,
        "UPCFAN_CONTROL_QUEUE_NAME": d.control_queue.name,
        "UPCFAN_ITEM_QUEUE_SHARDS": str(d.item_queue_shards),
        "UPCFAN_SMALL_ITEM_QUEUE_NAME": d.small_item_queue.name,
        "UPCFAN_SMALL_JOB_MAX_LINES": str(d.small_job_max_lines),
        "UPCFAN_INGEST_URL": d.function_url("ingest"),
        "UPCFAN_WORKER_URL": d.function_url("worker"),
        "UPCFAN_BUCKET": d.bucket,
        # The only buckets a job may be planned from besides UPCFAN_BUCKET (trust boundary of
        # POST /api/batch/process and the ingest HTTP trigger); set even when empty, so deploy
        # replaces an older list.
        "UPCFAN_SUBMIT_BUCKETS": ",".join(d.submit_buckets),
        "UPCFAN_TASK_SERVICE_ACCOUNT": d.sa_email("tasks_invoker"),
        # What a dropped file runs when neither its request nor its object metadata names a
        # handler: an explicit deploy setting (unset, the code's default would be a dry run).
        "UPCFAN_DEFAULT_HANDLER": default_handler,
    }
    if marketplace_url:
        env["UPCFAN_MARKETPLACE_URL"] = marketplace_url
    # Where operators open the web console: alerts and job notes link to a job's page there.
    if console_url:
        env["UPCFAN_CONSOLE_URL"] = console_url.rstrip("/")
    return env


def deployment_profile(d: model.Desired, env: dict[str, str]) -> dict[str, str]:
    """What `upcfan --project P` needs of this deployment (shared/profiles.py): the functions' shared env
    (project, region, queues and shards, bucket, URLs, task service account, default handler,
    marketplace URL), the api's and sweeper's URLs, and the Slack webhook's secret by name. Never a
    secret's value."""
    from shared.profiles import SLACK_SECRET_ENV

    return {**env, "UPCFAN_API_URL": d.function_url("api"), "UPCFAN_SWEEPER_URL": d.function_url("sweeper"),
            SLACK_SECRET_ENV: d.secret_path(model.SLACK_SECRET)}


def write_profile(d: model.Desired, env: dict[str, str], dry_run: bool) -> Path:
    """Writes the deployment's profile (mode 0600: it names accounts and URLs, no secrets); in a dry run
    prints where it would write and what."""
    from shared.envfile import write_env_file
    from shared.profiles import profile_path

    path = profile_path(d.project)
    values = deployment_profile(d, env)
    if dry_run:
        print(f"profile (dry run: not written) {path}, for upcfan --project {d.project}:", flush=True)
        print("\n".join(f"  {k}={v}" for k, v in values.items()), flush=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_env_file(path, values, mode=0o600)
    print(f"profile written: {path} (upcfan --project {d.project} reads it)", flush=True)
    return path


def _env_flag(env: dict[str, str]) -> str:
    body = ",".join(f"{k}={v}" for k, v in env.items())
    if "," in "".join(env.values()):  # gcloud alternate delimiter syntax
        body = "^@^" + "@".join(f"{k}={v}" for k, v in env.items())
    return f"--set-env-vars={body}"


def gcloud_deploy(spec: FunctionSpec, d: model.Desired, source: Path, build_hash: str, env: dict[str, str]) -> list[str]:
    cmd = [
        "gcloud", "functions", "deploy", spec.name,
        "--gen2", "--runtime=python311",
        f"--project={d.project}", f"--region={d.region}",
        f"--source={source}", f"--entry-point={spec.entry_point}",
        "--trigger-http", "--no-allow-unauthenticated",
        f"--service-account={d.sa_email(spec.service_account_role)}",
        f"--memory={spec.memory}", f"--cpu={spec.cpu}", f"--timeout={spec.timeout_s}s",
        f"--concurrency={spec.concurrency}",
        f"--min-instances={spec.min_instances}", f"--max-instances={spec.max_instances}",
        _env_flag({**env, **spec.env()}),
        f"--update-labels=app=upcfan,upcfan-build={build_hash}",
        "--quiet",
    ]
    if spec.secrets:
        cmd.append("--set-secrets=" + ",".join(f"{var}={secret}:latest" for var, secret in spec.secrets))
    return cmd


def infra_cmd(action: str, d: model.Desired, before_deploy: bool) -> list[str]:
    cmd = [sys.executable, "-m", "infra", action, f"--project={d.project}", f"--region={d.region}",
           f"--item-queue-shards={d.item_queue_shards}"]
    if d.bucket:
        cmd.append(f"--bucket={d.bucket}")
    cmd += [f"--submit-bucket={b}" for b in d.submit_buckets]
    cmd += [f"--alert-channel={c}" for c in d.alert_channels]
    if before_deploy:
        cmd.append("--before-deploy")
    return cmd


def secrets_cmd(d: model.Desired, fns: list[str], secret_files: list[str]) -> list[str]:
    """`python -m infra secrets`: every secret these functions mount has a value, or a refusal naming it."""
    cmd = [sys.executable, "-m", "infra", "secrets", f"--project={d.project}", f"--region={d.region}",
           f"--functions={','.join(fns)}"]
    return cmd + [f"--secret-file={pair}" for pair in secret_files]


def handler_needs_marketplace(name: str) -> bool:
    from shared.handlers.dry_run import DryRunHandler

    return name != DryRunHandler.name


def handler_mode(name: str) -> str:
    """How deploy states the mode of dropped files."""
    if not handler_needs_marketplace(name):
        return f"{name} (DRY RUN: items are checked, nothing is sent to the marketplace)"
    return f"{name} (LIVE: items are sent to the marketplace)"


def describe(spec: FunctionSpec, d: model.Desired, env: dict[str, str]) -> list[str]:
    """A function's resulting configuration, as deploy prints it (values of secrets never appear)."""
    lines = [f"function {spec.name}: service account {d.sa_email(spec.service_account_role)}, "
             f"timeout {spec.timeout_s}s, concurrency {spec.concurrency}, "
             f"instances {spec.min_instances}..{spec.max_instances}"]
    lines += [f"  env {k}={v}" for k, v in env.items()]
    lines += [f"  secret {var} <- {secret}:latest" for var, secret in spec.secrets]
    return lines


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/deploy", description="Build and deploy upcfan's functions.")
    p.add_argument("--project", required=True)
    p.add_argument("--region", required=True)
    p.add_argument("--bucket", default="")
    p.add_argument("--item-queue-shards", type=int, default=None)
    p.add_argument("--submit-bucket", action="append", default=[], metavar="BUCKET",
                   help="a further bucket jobs may be submitted from with POST /api/batch/process, the ingest "
                        "HTTP trigger or `upcfan submit` (never watched); repeatable")
    p.add_argument("--alert-channel", action="append", default=[], metavar="CHANNEL",
                   help="a Cloud Monitoring notification channel (projects/P/notificationChannels/ID) the "
                        "sweeper watchdog alerts; repeatable")
    p.add_argument("--marketplace-url", default="")
    p.add_argument("--console-url", default="",
                   help="where operators open the web console (an IAP address, or http://127.0.0.1:PORT of "
                        "`upcfan console --port PORT`); Slack alerts and job notes link to job pages there")
    from shared.handlers.registry import known_handler_names

    p.add_argument("--default-handler", required=True, choices=known_handler_names(),
                   help="the handler a dropped file runs when neither its request nor its object metadata "
                        "names one (dry_run = dry run, marketplace_draft = live); required: the mode of "
                        "production is a deploy decision")
    p.add_argument("--secret-file", action="append", default=[], metavar="SECRET_ID=PATH",
                   help="value for a secret that has none yet (first deploy); repeatable")
    p.add_argument("--functions", default=",".join(model.FUNCTIONS), help="comma list (default: all)")
    p.add_argument("--source-root", type=Path, default=REPO_ROOT)
    p.add_argument("--build-dir", type=Path, default=None, help="default: <source-root>/build")
    p.add_argument("--skip-infra", action="store_true", help="do not run `python -m infra apply` around the deploys")
    p.add_argument("--dry-run", action="store_true", help="build locally, print every command, run none")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """In order: infra (service accounts, queues, secret containers, grants that need no function),
    every mounted secret has a value (or stop before any deploy, naming it), each function built
    and deployed, then infra again (invokers on the new services, scheduler, Eventarc)."""
    args = parse(argv)
    d = model.from_settings(args.project, args.region, bucket=args.bucket, item_queue_shards=args.item_queue_shards,
                            submit_buckets=tuple(args.submit_bucket), alert_channels=tuple(args.alert_channel))
    fns = [f for f in args.functions.split(",") if f]
    unknown = sorted(set(fns) - set(model.FUNCTIONS))
    if unknown:
        raise SystemExit(f"deploy: unknown functions {unknown}")
    specs = [s for s in function_specs(d.item_queue_shards) if s.name in fns]
    build_root = args.build_dir or (args.source_root / "build")
    if handler_needs_marketplace(args.default_handler) and not args.marketplace_url:
        raise SystemExit(f"deploy: --default-handler {args.default_handler} sends items to the marketplace: "
                         f"give --marketplace-url")
    env = env_vars(d, args.marketplace_url, args.default_handler, args.console_url)
    print(f"dropped files run: {handler_mode(args.default_handler)}", flush=True)

    def run(cmd: list[str], step: str) -> None:
        print(("DRY-RUN " if args.dry_run else "+ ") + shlex.join(cmd), flush=True)
        if not args.dry_run:
            try:
                subprocess.run(cmd, check=True, cwd=REPO_ROOT)
            except subprocess.CalledProcessError as exc:
                raise SystemExit(f"deploy: stopped at {step} (exit {exc.returncode}); see the messages above") from exc

    if not args.skip_infra:
        run(infra_cmd("apply", d, before_deploy=True), "infra apply --before-deploy")
    run(secrets_cmd(d, fns, args.secret_file), "the secret values check, before any function deploy")
    for spec in specs:
        out, digest = build(spec.name, args.source_root, build_root)
        print(f"build {spec.name}: {out} sha256:{digest}", flush=True)
        print("\n".join(describe(spec, d, env)), flush=True)
        run(gcloud_deploy(spec, d, out, digest, env), f"deploying {spec.name}")
    if not args.skip_infra:
        # invokers on the now-existing services, the scheduler job and the Eventarc trigger
        run(infra_cmd("apply", d, before_deploy=False), "infra apply (after deploy)")
    # Last, once everything it describes exists: the operator's CLI reads it (upcfan --project).
    write_profile(d, env, args.dry_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
