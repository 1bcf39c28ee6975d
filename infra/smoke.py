"""`scripts/smoke`: does a deployment (the local stack, or a real project after deploy) work end to end?

Checks, in order, each printed as a line `ok|FAIL <check>: <detail>`; the exit code is the number of
failed checks (0 = healthy):
1. `GET /health` on the api answers 200, with the caller's ID token (the api is private).
2. A tiny file (three fresh UPCs, dry run unless `--live`) uploaded to the watched bucket completes,
   all three items succeeded.
3. Each task kind reached its function with a valid token: locally the Cloud Tasks emulator's
   history shows the job's plan, chunk, item and progress tasks answered 2xx (the invoker gate answers
   401/403 to a bad token); in production, where executed tasks leave no history, a completed job is
   that evidence for plan, chunk and item (each step runs only in its task), and the job-finished
   note's actor (`K_SERVICE`) says whether a /progress task (worker) or the last chunk (ingest)
   completed it.
4. The sweeper ran through the scheduler path: the scheduler job run now (local stand-in `/_run`, or
   Cloud Scheduler's RunJob) and its attempt succeeded.
5. A Slack note arrived: the job's `job_finished_note` event says the post succeeded (and, locally,
   the Slack sink holds the note).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import requests
from stdnum import ean

from shared.naming import chunk_task_name_for, job_id_for, plan_task_name_for, progress_task_name_for, task_name_for

DEADLINE_S = 180.0


@dataclass
class Target:
    """Where the smoke check runs: URLs, the bucket, how to authenticate, and the platform's checks."""

    api_url: str
    bucket: str
    id_token: Callable[[], str]
    local_env: dict[str, str] | None = None  # the local stack's stack.env; None in production
    project: str = ""
    region: str = ""

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.id_token()}"}


def _fresh_upcs(n: int) -> list[str]:
    rng = random.Random()
    out: set[str] = set()
    while len(out) < n:
        body = f"{rng.randrange(10**10, 10**11)}"
        out.add(body + ean.calc_check_digit(body))
    return sorted(out)


def _poll(fn: Callable[[], object], timeout_s: float, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


class Smoke:
    def __init__(self, target: Target, live: bool) -> None:
        self.t = target
        self.live = live
        self.failed = 0
        self.job_id = ""
        self.upcs: list[str] = []
        self.job: dict = {}

    def report(self, ok: bool, check: str, detail: str) -> bool:
        print(f"{'ok  ' if ok else 'FAIL'} {check}: {detail}", flush=True)
        self.failed += 0 if ok else 1
        return ok

    def run(self) -> int:
        self.health()
        if self.tiny_file():
            self.task_kinds()
            self.slack_note()
        self.scheduler()
        print(f"smoke: {self.failed} check(s) failed" if self.failed else "smoke: all checks passed", flush=True)
        return self.failed

    # ---- checks --------------------------------------------------------------------------------

    def health(self) -> None:
        r = requests.get(f"{self.t.api_url}/health", headers=self.t.headers(), timeout=30)
        self.report(r.status_code == 200, "health", f"GET /health answered {r.status_code} {r.text[:200]}")

    def tiny_file(self) -> bool:
        from shared.clients import storage_client

        self.upcs = _fresh_upcs(3)
        blob = storage_client().bucket(self.t.bucket).blob(f"smoke/{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-"
                                                          f"{random.randrange(10**6)}.txt")
        if not self.live:
            blob.metadata = {"upcfan-handler": "dry_run"}
        blob.upload_from_string("\n".join(self.upcs) + "\n", content_type="text/plain")
        self.job_id = job_id_for(self.t.bucket, blob.name, blob.generation)

        def final():
            r = requests.get(f"{self.t.api_url}/api/batch/status/{self.job_id}", headers=self.t.headers(), timeout=30)
            view = r.json() if r.status_code == 200 else {}
            return view if view.get("status") in ("completed", "completed_with_failures", "failed", "cancelled") else None

        self.job = _poll(final, DEADLINE_S) or {}
        outcome = self.job.get("outcome") or {}
        return self.report(self.job.get("status") == "completed" and outcome.get("succeeded") == 3, "tiny file",
                           f"gs://{self.t.bucket}/{blob.name} -> job {self.job_id}: "
                           f"{self.job.get('status', f'not finished after {DEADLINE_S:.0f}s')} {outcome}")

    def task_kinds(self) -> None:
        if self.t.local_env is None:
            # Executed tasks leave no history in Cloud Tasks: a completed job shows plan, chunk and item tasks
            # ran; the completion's writer (the note event's actor, K_SERVICE) shows which path finished it.
            actor = self._note_event().get("actor")
            self.report(actor in ("worker", "ingest"), "task kinds",
                        f"plan, chunk and item tasks ran (the job completed); {actor!r} completed it "
                        f"({'a /progress task' if actor == 'worker' else 'the last chunk'}); each kind's own "
                        f"answer is checked on the local stack")
            return
        from devstack.cloudtasks import client as ct

        env = self.t.local_env
        host = env["CLOUD_TASKS_EMULATOR_HOST"]
        control, items = env["UPCFAN_CONTROL_QUEUE"].rsplit("/", 1)[1], env["UPCFAN_QUEUE"].rsplit("/", 1)[1]
        window_s = float(os.environ.get("UPCFAN_PROGRESS_CHECK_S") or 5.0)
        now = time.time()
        progress = [(control, progress_task_name_for(self.job_id, w))
                    for w in range(int((now - DEADLINE_S - 60) // window_s), int(now // window_s) + 2)]
        kinds = {
            "plan": [(control, plan_task_name_for(self.job_id))],
            "chunk": [(control, chunk_task_name_for(self.job_id, 0))],
            "item": [(items, task_name_for(self.job_id, upc.zfill(14), 1)) for upc in self.upcs],
            "progress": progress,
        }

        def answers(tasks: list[tuple[str, str]]) -> list:
            return [a.get("status") for queue, task in tasks for a in ct.attempts(host, queue, task)]

        def answered_2xx(tasks: list[tuple[str, str]]) -> list:
            got = answers(tasks)
            return got if any(isinstance(s, int) and 200 <= s < 300 for s in got) else []

        for kind, tasks in kinds.items():
            # A progress check is scheduled at the end of its window, so it may run after the job was
            # completed by another path (a fast job completes when fan-out ends): wait a window or two.
            got = _poll(lambda: answered_2xx(tasks), 3 * window_s + 10) or answers(tasks)
            ok = any(isinstance(s, int) and 200 <= s < 300 for s in got)
            self.report(ok and not any(s in (401, 403) for s in got), f"{kind} task",
                        f"answers {got} (2xx: reached its function with a valid token)")

    def scheduler(self) -> None:
        if self.t.local_env is not None:
            r = requests.post(f"{self.t.local_env['UPCFAN_SCHEDULER_URL']}/_run", timeout=330)
            status = r.json().get("status") if r.ok else r.status_code
            self.report(status == 200, "scheduler -> sweeper", f"the sweeper job ran now: the sweeper answered {status}")
            return
        from google.cloud import scheduler_v1

        from infra.model import SCHEDULER_JOB

        client = scheduler_v1.CloudSchedulerClient()
        name = f"projects/{self.t.project}/locations/{self.t.region}/jobs/{SCHEDULER_JOB}"
        before = client.get_job(name=name).last_attempt_time
        client.run_job(name=name)

        def attempted():
            job = client.get_job(name=name)
            return job if job.last_attempt_time and job.last_attempt_time != before else None

        job = _poll(attempted, 330, 5.0)
        code = job.status.code if job else None
        self.report(code == 0, "scheduler -> sweeper",
                    f"RunJob {name}: last attempt status code {code} ({job.status.message if job else 'no attempt seen'})")

    def slack_note(self) -> None:
        event = _poll(self._note_event, 30)
        details = (event or {}).get("details") or {}
        ok = bool(details.get("sent"))
        if ok and self.t.local_env is not None:
            sink = self.t.local_env["UPCFAN_SLACK_SINK_URL"]
            ok = any(self.job_id in (m.get("text") or "") for m in requests.get(f"{sink}/", timeout=10).json()["messages"])
        self.report(ok, "slack note", f"job_finished_note {details or 'not recorded'}")

    def _note_event(self) -> dict:
        from shared.clients import firestore_client
        from shared.model import EVENTS, JOBS

        snap = firestore_client().collection(JOBS).document(self.job_id).collection(EVENTS).document(
            "job_finished_note").get()
        return (snap.to_dict() or {}) if snap.exists else {}


# ---- targets ---------------------------------------------------------------------------------------

def local_target() -> Target:
    from devstack import stack

    env = stack.read_env_file()
    if not env:
        raise SystemExit("smoke: the local stack is not up (scripts/dev up)")
    os.environ.update(env)  # shared.clients talk to the emulators as the local operator
    return Target(api_url=env["UPCFAN_API_URL"], bucket=env["UPCFAN_BUCKET"],
                  id_token=lambda: env["UPCFAN_OPERATOR_TOKEN"], local_env=env)


def production_target(args: argparse.Namespace) -> Target:
    from infra import model

    d = model.from_settings(args.project, args.region, bucket=args.bucket)
    if not d.bucket:
        raise SystemExit("smoke: name the watched bucket (--bucket)")
    os.environ["GOOGLE_CLOUD_PROJECT"] = args.project
    api_url = args.api_url or d.function_url("api")
    token = args.id_token or os.environ.get("UPCFAN_ID_TOKEN", "")

    def id_token() -> str:
        nonlocal token
        if not token:  # a person's gcloud login; a service account can use --id-token
            token = subprocess.run(["gcloud", "auth", "print-identity-token"], check=True, capture_output=True,
                                   text=True).stdout.strip()
        return token

    return Target(api_url=api_url, bucket=d.bucket, id_token=id_token, project=args.project, region=args.region)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/smoke", description=__doc__.split("\n", 1)[0])
    p.add_argument("--project", help="a deployed project (default: the local stack)")
    p.add_argument("--region", default="us-central1")
    p.add_argument("--bucket", default="", help="the watched bucket (production)")
    p.add_argument("--api-url", default="", help="the api's URL (production; default: the model's URL)")
    p.add_argument("--id-token", default="", help="an ID token for the api (default: gcloud auth print-identity-token)")
    p.add_argument("--live", action="store_true", help="run the file with the deployment's default handler, not dry run")
    args = p.parse_args(argv)
    target = production_target(args) if args.project else local_target()
    return min(Smoke(target, args.live).run(), 100)


if __name__ == "__main__":
    sys.exit(main())
