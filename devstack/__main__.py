"""`python -m devstack up|down|status`: the local cloud stack in one command."""

from __future__ import annotations

import argparse
import json
import sys

from devstack import paths
from devstack.procs import StackError
from devstack.stack import COMPONENTS, down, read_env_file, status, up


def _print_status(st: dict) -> None:
    if not st["components"]:
        print("stack is down")
        return
    for name, c in st["components"].items():
        state = "healthy" if c["healthy"] else ("running, not healthy" if c["alive"] else "dead")
        print(f"  {name:<12} pid {c['pid']!s:<8} {state:<22} {c.get('url', '')}")
    print("stack is UP" if st["up"] else "stack is NOT healthy (scripts/dev down; scripts/dev up)")
    if st["up"]:
        print(f"env: {paths.STACK_ENV}   logs: {paths.LOG_DIR}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/dev", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the stack in the background; returns when it is ready")
    p_up.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="COMPONENT",
        help=f"leave a component out (repeatable; 'functions' = all four); one of {', '.join(COMPONENTS)}",
    )
    p_up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    sub.add_parser("down", help="stop every process of the stack")
    p_status = sub.add_parser("status", help="show components; exit 0 only when all are healthy")
    p_status.add_argument("--json", action="store_true")
    sub.add_parser("env", help="print .local/stack.env (for `set -a; . .local/stack.env`)")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            env = up(skip=set(args.skip), timeout_s=args.timeout)
            for k, v in env.items():
                print(f"  {k}={v}")
            return 0
        if args.command == "down":
            down()
            return 0
        if args.command == "status":
            st = status()
            if args.json:
                print(json.dumps(st, indent=2))
            else:
                _print_status(st)
            return 0 if st["up"] else 1
        if args.command == "env":
            env = read_env_file()
            if env is None:
                print("stack is down (no .local/stack.env)", file=sys.stderr)
                return 1
            for k, v in env.items():
                print(f"{k}={v}")
            return 0
    except StackError as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("devstack: interrupted; stopping what was started", file=sys.stderr)
        down()
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
