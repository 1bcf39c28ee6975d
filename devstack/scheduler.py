"""Local Cloud Scheduler: the sweeper job of the infra model, on its schedule, with its OIDC token.

The job is what `infra/resources/scheduler.py::SweeperJob.desired()` creates in Google Cloud: at each
time of the cron `schedule` (UTC), `POST uri` with an ID token of the scheduler invoker account whose
`aud` is the job's audience (the sweeper's service URL), giving up after `attempt_deadline` (no
retries: Cloud Scheduler's default retry count is 0). The sweeper's invoker gate checks that token as
Cloud Run does.

Control routes (not Cloud Scheduler's API; what tests and scripts/smoke use):
  POST /_run      run the job now (as `gcloud scheduler jobs run`), wait, answer {"status", "response", ...}
  POST /_pause    stop firing on the schedule;  POST /_resume  start again
  GET  /_job      the job: uri, audience, invoker, schedule, state, next run time
  GET  /_runs     every run so far (time, trigger, status, duration);  GET /_health
  POST /_watchdog {"period_s": P}  arm the watchdog with this period (0 disarms); GET /_watchdog

Watchdog (the local equivalent of infra's "upcfan sweeper stopped" policy, infra/resources/monitoring.py):
when no run has succeeded (2xx) for three periods, it posts one alert to the Slack webhook
(`--watchdog-webhook`, the local Slack sink), and again only after a run has succeeded in between. The
period is the schedule's; `period_s` is a local-only knob so a test needs no 15-minute wait. Armed from
the start unless `--paused` (test stacks): pausing the job is exactly what it should notice, but a test
stack's paused scheduler must not post into a test that counts Slack messages.

`--paused` starts it paused. Test stacks run it paused (a background sweep could post Slack alerts or
flag a test's job in the middle of a test that counts them); `scripts/dev up` runs it live, as deployed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import time

import aiohttp
from aiohttp import web
from cronsim import CronSim

from devstack import identity
from devstack.procs import run_local_server

log = logging.getLogger("scheduler")
STATE_KEY = web.AppKey("scheduler", object)


class Job:
    def __init__(self, name: str, uri: str, audience: str, invoker_email: str, schedule: str,
                 attempt_deadline_s: float, paused: bool = False) -> None:
        CronSim(schedule, dt.datetime.now(dt.timezone.utc))  # refuse a bad schedule at start, not at first fire
        self.name = name
        self.uri = uri
        self.audience = audience or uri
        self.invoker_email = invoker_email
        self.schedule = schedule
        self.attempt_deadline_s = attempt_deadline_s
        self.paused = paused
        self.runs: list[dict] = []
        self.wake = asyncio.Event()
        self.next_run: dt.datetime | None = None
        # watchdog: the last successful run (or when watching began), the period, one alert per outage
        self.watchdog_webhook = ""
        self.watchdog_period_s = 0.0
        self.last_success = time.time()
        self.watchdog_alerts: list[dict] = []
        self.watchdog_alerted = False
        self.watchdog_wake = asyncio.Event()

    def schedule_period_s(self) -> float:
        now = dt.datetime.now(dt.timezone.utc)
        it = CronSim(self.schedule, now)
        first = next(it)
        return (next(it) - first).total_seconds()

    def describe(self) -> dict:
        return {"name": self.name, "uri": self.uri, "audience": self.audience, "invoker": self.invoker_email,
                "schedule": self.schedule, "time_zone": "Etc/UTC", "attempt_deadline_s": self.attempt_deadline_s,
                "state": "PAUSED" if self.paused else "ENABLED",
                "next_run": None if self.paused or not self.next_run else self.next_run.isoformat(),
                "runs": len(self.runs)}

    async def run(self, session: aiohttp.ClientSession, trigger: str) -> dict:
        """One attempt: POST the job's URI with a fresh ID token; the outcome is recorded and logged."""
        token = identity.mint(self.invoker_email, self.audience, ttl_s=identity.ID_TOKEN_TTL_S,
                              issuer=identity.GOOGLE_ISSUER)
        started = time.time()
        entry: dict = {"at": started, "trigger": trigger, "uri": self.uri}
        try:
            async with session.post(self.uri, headers={"Authorization": f"Bearer {token}"},
                                    timeout=aiohttp.ClientTimeout(total=self.attempt_deadline_s)) as resp:
                entry["status"] = resp.status
                entry["response"] = (await resp.text())[:2000]
        except asyncio.TimeoutError:
            entry["status"], entry["response"] = "deadline_exceeded", f"no answer within {self.attempt_deadline_s:g}s"
        except aiohttp.ClientError as exc:
            entry["status"], entry["response"] = "error", repr(exc)[:500]
        entry["duration_s"] = round(time.time() - started, 3)
        self.runs.append(entry)
        ok = isinstance(entry["status"], int) and 200 <= entry["status"] < 300
        if ok:
            self.last_success = time.time()
            self.watchdog_alerted = False
        (log.info if ok else log.warning)("job %s run (%s): %s in %.2fs", self.name, trigger, entry["status"],
                                          entry["duration_s"])
        return entry

    async def timer(self, session: aiohttp.ClientSession) -> None:
        while True:
            now = dt.datetime.now(dt.timezone.utc)
            self.next_run = next(CronSim(self.schedule, now))
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=max(0.0, (self.next_run - now).total_seconds()))
                continue  # paused, resumed or asked to recompute: start over
            except asyncio.TimeoutError:
                pass
            if not self.paused:
                asyncio.create_task(self.run(session, "schedule"))


    def watchdog_state(self) -> dict:
        return {"armed": self.watchdog_period_s > 0, "period_s": self.watchdog_period_s,
                "silent_for_s": round(time.time() - self.last_success, 3), "alerts": self.watchdog_alerts}

    async def watchdog(self, session: aiohttp.ClientSession) -> None:
        """Alert once when no run has succeeded for PERIODS_WITHOUT_SWEEP periods."""
        from infra.resources.monitoring import PERIODS_WITHOUT_SWEEP, WATCHDOG_DOC

        while True:
            self.watchdog_wake.clear()
            period = self.watchdog_period_s
            interval = min(max(period / 4, 0.2), 15.0) if period > 0 else 3600.0
            try:
                await asyncio.wait_for(self.watchdog_wake.wait(), timeout=interval)
                continue  # re-armed: start over with the new period
            except asyncio.TimeoutError:
                pass
            silent = time.time() - self.last_success
            if period <= 0 or self.watchdog_alerted or silent < PERIODS_WITHOUT_SWEEP * period:
                continue
            self.watchdog_alerted = True
            state = "PAUSED" if self.paused else "ENABLED"
            doc = WATCHDOG_DOC.format(periods=PERIODS_WITHOUT_SWEEP, minutes=round(silent / 60, 1))
            text = (f"CRITICAL: upcfan sweeper stopped: no sweep succeeded for {silent:.0f}s "
                    f"({PERIODS_WITHOUT_SWEEP} periods of {period:g}s; job {self.name} {state}). {doc}")
            alert = {"at": time.time(), "silent_for_s": round(silent, 3), "state": state, "status": None}
            try:
                async with session.post(self.watchdog_webhook, json={"text": text, "blocks": [
                        {"type": "section", "text": {"type": "mrkdwn", "text": text}}]},
                        timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    alert["status"] = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                alert["status"] = repr(exc)[:200]
                self.watchdog_alerted = False  # not delivered: try again at the next check
            self.watchdog_alerts.append(alert)
            log.warning("watchdog: no successful sweep for %.0fs (%s); alert %s", silent, state, alert["status"])


async def _run(request: web.Request) -> web.Response:
    job: Job = request.app[STATE_KEY]
    return web.json_response(await job.run(request.app["session"], "manual"))


async def _pause(request: web.Request) -> web.Response:
    job: Job = request.app[STATE_KEY]
    job.paused = True
    job.wake.set()
    return web.json_response(job.describe())


async def _resume(request: web.Request) -> web.Response:
    job: Job = request.app[STATE_KEY]
    job.paused = False
    job.wake.set()
    return web.json_response(job.describe())


async def _watchdog_get(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].watchdog_state())


async def _watchdog_set(request: web.Request) -> web.Response:
    job: Job = request.app[STATE_KEY]
    body = await request.json() if request.can_read_body else {}
    try:
        period = float(body.get("period_s", job.schedule_period_s()))
    except (TypeError, ValueError):
        return web.json_response({"error": "period_s must be a number of seconds (0 disarms)"}, status=400)
    if period < 0:
        return web.json_response({"error": "period_s must be >= 0 (0 disarms)"}, status=400)
    if period > 0 and not job.watchdog_webhook:
        return web.json_response({"error": "no --watchdog-webhook: nowhere to alert"}, status=409)
    job.watchdog_period_s = period
    job.last_success = time.time()  # watching starts now
    job.watchdog_alerted = False
    job.watchdog_wake.set()
    return web.json_response(job.watchdog_state())


async def _job(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].describe())


async def _runs(request: web.Request) -> web.Response:
    runs = request.app[STATE_KEY].runs
    return web.json_response({"runs": runs, "total": len(runs)})


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "component": "scheduler", **request.app[STATE_KEY].describe()})


def make_app(job: Job) -> web.Application:
    app = web.Application()
    app[STATE_KEY] = job

    async def timer(app: web.Application):
        async with aiohttp.ClientSession() as session:
            app["session"] = session
            tasks = [asyncio.create_task(job.timer(session)), asyncio.create_task(job.watchdog(session))]
            yield
            for task in tasks:
                task.cancel()

    app.cleanup_ctx.append(timer)
    app.router.add_post("/_run", _run)
    app.router.add_post("/_pause", _pause)
    app.router.add_post("/_resume", _resume)
    app.router.add_get("/_job", _job)
    app.router.add_get("/_watchdog", _watchdog_get)
    app.router.add_post("/_watchdog", _watchdog_set)
    app.router.add_get("/_runs", _runs)
    app.router.add_get("/_health", _health)
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="local Cloud Scheduler: one HTTP job with an OIDC token")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--job", default="upcfan-sweeper")
    p.add_argument("--uri", required=True)
    p.add_argument("--audience", default="", help="the ID token's aud (default: the URI)")
    p.add_argument("--invoker-email", required=True)
    p.add_argument("--schedule", required=True, help="cron, UTC")
    p.add_argument("--attempt-deadline-s", type=float, default=300.0)
    p.add_argument("--paused", action="store_true", help="start paused (test stacks)")
    p.add_argument("--watchdog-webhook", default="", help="Slack webhook the watchdog alerts (the local sink)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    job = Job(args.job, args.uri, args.audience, args.invoker_email, args.schedule, args.attempt_deadline_s,
              paused=args.paused)
    job.watchdog_webhook = args.watchdog_webhook
    if args.watchdog_webhook and not args.paused:  # test stacks start paused and unarmed: see the docstring
        job.watchdog_period_s = job.schedule_period_s()
    run_local_server(make_app(job), "scheduler", args.host, args.port)


if __name__ == "__main__":
    main()
