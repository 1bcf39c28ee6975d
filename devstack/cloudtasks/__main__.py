"""Entry point: python -m devstack.cloudtasks --host 127.0.0.1 --port PORT [--tombstone-seconds N]."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from pathlib import Path
import sys
import time

from aiohttp import web

from devstack.cloudtasks.emulator import Emulator
from devstack.cloudtasks.server import make_app

_STD_ATTRS = set(logging.LogRecord("x", 0, "x", 0, "x", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        for k, v in record.__dict__.items():
            if k not in _STD_ATTRS:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m devstack.cloudtasks", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8123, help="0 picks a free port (printed in the ready line)")
    p.add_argument("--grpc-port", type=int, default=None,
                   help="also serve the gRPC API on this port (0: a free one, printed in the ready line as "
                        "grpc=HOST:PORT); default: REST only")
    p.add_argument("--tombstone-seconds", type=float, default=3600.0,
                   help="how long an ended task's name stays reserved (Cloud Tasks: ~1 h)")
    p.add_argument("--duplicate-deliveries", type=int, default=0, help="extra copies of every dispatch (chaos)")
    p.add_argument("--min-dispatch-deadline", type=float, default=15.0,
                   help="lower clamp for dispatch_deadline in seconds (Cloud Tasks: 15)")
    p.add_argument("--iam-policy", choices=["none", "local"], default="none",
                   help="local: enforce the local stack's IAM policy (devstack/iam.py) on every /v2 call; "
                        "none: open (standalone use, conformance tests)")
    p.add_argument("--location", default=os.environ.get("UPCFAN_LOCATION", "us-central1"),
                   help="the local project's location (for --iam-policy local)")
    p.add_argument("--iam-log-dir", default="", help="where the call log goes (default: the stack's run dir)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def _enforcer(args):
    if args.iam_policy == "none":
        return None
    from devstack import iam, paths

    policy = iam.local_policy(args.location)
    log_dir = Path(args.iam_log_dir) if args.iam_log_dir else paths.RUN_DIR
    logging.getLogger("cloudtasks-emulator").info(
        "iam enforced", extra={"project": policy.desired.project, "dropped_grants": list(policy.dropped)})
    return iam.Enforcer(policy, iam.CallLog(log_dir, "cloudtasks", policy))


async def _serve(args) -> None:
    emu = Emulator(tombstone_seconds=args.tombstone_seconds, duplicate_deliveries=args.duplicate_deliveries,
                   min_dispatch_deadline=args.min_dispatch_deadline)
    enforcer = _enforcer(args)
    app = make_app(emu, enforcer)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=1024, reuse_address=True)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    grpc_server, grpc_note = None, ""
    if args.grpc_port is not None:
        from devstack.cloudtasks.grpc_api import start_grpc_server

        grpc_server, grpc_port = await start_grpc_server(emu, enforcer, args.host, args.grpc_port)
        grpc_note = f" grpc={args.host}:{grpc_port}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"CLOUDTASKS_EMULATOR_READY http://{args.host}:{port}{grpc_note} "
          f"(tombstone_seconds={args.tombstone_seconds:g}, iam_policy={args.iam_policy})", flush=True)
    await stop.wait()
    logging.getLogger("cloudtasks-emulator").info("shutting down")
    if grpc_server is not None:
        await grpc_server.stop(grace=1)
    await runner.cleanup()


def main(argv=None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(args.log_level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        import uvloop  # type: ignore

        uvloop.install()
    except ImportError:
        pass
    t0 = time.time()
    asyncio.run(_serve(args))
    logging.getLogger("cloudtasks-emulator").info("stopped", extra={"uptime_s": round(time.time() - t0, 3)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
