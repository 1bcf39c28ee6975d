"""`python -m infra plan|apply|secrets --project P --region R [--bucket B] [--item-queue-shards N]`,
and `python -m infra audit [--run-dir DIR]` (the local stack's IAM call log against the model;
exits 1 on any finding, 2 without a call log: infra/audit.py).

`secrets` checks that every secret the selected functions mount has a value (adding one from
`--secret-file ID=PATH` where none exists) and exits non-zero naming each missing one; scripts/deploy
runs it before any function deploy.
"""

from __future__ import annotations

import argparse
import sys

from infra import model, runner, stack
from infra.clients import Clients


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infra", description="Plan or apply upcfan's cloud resources.")
    p.add_argument("command", choices=["plan", "apply", "secrets", "audit"])
    p.add_argument("--project", help="required by plan, apply and secrets")
    p.add_argument("--region", help="required by plan, apply and secrets")
    p.add_argument("--run-dir", default="", help="audit: the local stack's run dir (default: .local/run, or "
                                                 "UPCFAN_LOCAL_DIR/run)")
    p.add_argument("--bucket", default="", help="watched bucket (default: UPCFAN_BUCKET)")
    p.add_argument("--submit-bucket", action="append", default=[], metavar="BUCKET",
                   help="a further bucket jobs may be submitted from (never watched); repeatable")
    p.add_argument("--item-queue-shards", type=int, default=None,
                   help="number of item queues (default: UPCFAN_ITEM_QUEUE_SHARDS or 1)")
    p.add_argument("--sweep-schedule", default="*/5 * * * *")
    p.add_argument("--alert-channel", action="append", default=[], metavar="CHANNEL",
                   help="a Cloud Monitoring notification channel (projects/P/notificationChannels/ID) the "
                        "sweeper watchdog alerts; repeatable (docs/operations.md: who watches the watcher)")
    p.add_argument("--url-template", default=model.DEFAULT_URL_TEMPLATE,
                   help="function URL pattern with {region} {project} {function}")
    p.add_argument("--before-deploy", action="store_true",
                   help="skip resources that need the functions deployed (invokers, scheduler, eventarc)")
    p.add_argument("--only", action="append", default=[],
                   help="only resource kinds starting with this (e.g. cloudtasks); repeatable")
    p.add_argument("--functions", default=",".join(model.FUNCTIONS),
                   help="secrets: only the secrets these functions mount (comma list)")
    p.add_argument("--secret-file", action="append", default=[], metavar="SECRET_ID=PATH",
                   help="secrets: add the value in PATH to SECRET_ID if it has none yet (repeatable)")
    args = p.parse_args(argv)
    if args.command != "audit" and not (args.project and args.region):
        p.error(f"{args.command} needs --project and --region")
    return args


def secret_files(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        secret_id, sep, path = pair.partition("=")
        if not sep or secret_id not in model.SECRETS or not path:
            raise SystemExit(f"--secret-file {pair!r}: expected SECRET_ID=PATH with SECRET_ID one of {list(model.SECRETS)}")
        out[secret_id] = path
    return out


def secrets_main(args, clients: Clients, echo) -> int:
    from infra.resources.secrets import require_values

    fns = [f for f in args.functions.split(",") if f]
    needed = sorted({secret for fn in fns for _, secret in model.FUNCTION_SECRETS.get(fn, ())})
    problems = require_values(clients.get("secrets"), args.project, needed, secret_files(args.secret_file), echo)
    for problem in problems:
        echo(f"missing: {problem}")
    return 1 if problems else 0


def audit_main(args, echo) -> int:
    """The local stack's call log against the model (the stack's own project and location)."""
    from pathlib import Path

    from devstack import iam, paths
    from devstack.stack import FUNCTIONS, local_desired, read_env_file
    from infra import audit

    run_dir = Path(args.run_dir) if args.run_dir else paths.RUN_DIR
    entries = iam.read_call_log(run_dir)
    if not entries:
        echo(f"no IAM call log under {run_dir} (iam-calls-*.jsonl): is the local stack up?")
        return 2
    env = read_env_file(run_dir.parent / "stack.env") or {}
    from shared.config import load_settings

    location = env.get("UPCFAN_LOCATION") or load_settings().location
    policy = iam.Policy(local_desired({name: 0 for name in FUNCTIONS}, location))
    report = audit.audit(entries, policy)
    echo(audit.render(report, str(run_dir)))
    return 1 if report.findings else 0


def select(args, resources):
    if args.before_deploy:
        resources = [r for r in resources if not getattr(r, "after_deploy", False)]
    if args.only:
        resources = [r for r in resources if any(r.kind.startswith(k) for k in args.only)]
    return resources


def main(argv=None, clients: Clients | None = None, out=None) -> int:
    args = parse(argv)
    out = out or sys.stdout
    if args.command == "audit":
        return audit_main(args, lambda s: print(s, file=out))
    desired = model.from_settings(args.project, args.region, bucket=args.bucket,
                                  item_queue_shards=args.item_queue_shards,
                                  sweep_schedule=args.sweep_schedule, url_template=args.url_template,
                                  submit_buckets=tuple(args.submit_bucket),
                                  alert_channels=tuple(args.alert_channel))
    resources = select(args, stack.build(desired))
    clients = clients or Clients()
    echo = lambda s: print(s, file=out)  # noqa: E731
    if args.command == "secrets":
        return secrets_main(args, clients, echo)
    if not desired.alert_channels and any(r.kind == "monitoring.alertPolicy" for r in resources):
        echo("note: no --alert-channel: the sweeper watchdog opens incidents in Cloud Monitoring but notifies "
             "nobody (docs/operations.md, who watches the watcher)")
    if args.command == "plan":
        changes = runner.plan(resources, clients)
        for c in changes:
            echo(c.render())
    else:
        changes = runner.apply(resources, clients, echo)
    echo(runner.summary(changes, "Plan" if args.command == "plan" else "Applied"))
    return 0
