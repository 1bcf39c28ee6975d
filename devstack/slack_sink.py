"""Local Slack incoming-webhook sink: stores posted messages, can be told to fail like Slack does."""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone

from aiohttp import web

from devstack.procs import run_local_server

SINK_KEY = web.AppKey("sink", dict)


def _new_state() -> dict:
    return {"messages": [], "fail": {"status": 0, "count": 0, "retry_after": 0}, "failed_posts": 0}


async def _post_message(request: web.Request) -> web.Response:
    state = request.app[SINK_KEY]
    raw = await request.read()
    fail = state["fail"]
    if fail["count"] > 0:
        fail["count"] -= 1
        state["failed_posts"] += 1
        status = int(fail["status"] or 500)
        if status == 429:
            return web.Response(
                status=429, text="rate_limited", headers={"Retry-After": str(int(fail["retry_after"] or 1))}
            )
        return web.Response(status=status, text="internal_error" if status >= 500 else "invalid_payload")
    try:
        body = json.loads(raw.decode("utf-8")) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return web.Response(status=400, text="invalid_payload")
    if not isinstance(body, dict):
        return web.Response(status=400, text="invalid_payload")
    # Slack rejects a message with neither text nor blocks; so do we, to catch empty alerts.
    if not body.get("text") and not body.get("blocks") and not body.get("attachments"):
        return web.Response(status=400, text="no_text")
    now = time.time()
    entry = dict(body)
    entry["received_at"] = datetime.fromtimestamp(now, timezone.utc).isoformat()
    entry["received_ts"] = now
    entry["path"] = request.path
    state["messages"].append(entry)
    return web.Response(text="ok")


async def _get_messages(request: web.Request) -> web.Response:
    state = request.app[SINK_KEY]
    return web.json_response({"messages": state["messages"], "failed_posts": state["failed_posts"]})


async def _fail(request: web.Request) -> web.Response:
    state = request.app[SINK_KEY]
    spec = await request.json() if request.can_read_body else {}
    state["fail"] = {
        "status": int(spec.get("status", 500)),
        "count": int(spec.get("count", 1)),
        "retry_after": float(spec.get("retry_after", 1)),
    }
    return web.json_response(state["fail"])


async def _reset(request: web.Request) -> web.Response:
    request.app[SINK_KEY].clear()
    request.app[SINK_KEY].update(_new_state())
    return web.json_response({"ok": True})


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "component": "slack_sink"})


def make_app() -> web.Application:
    app = web.Application()
    app[SINK_KEY] = _new_state()
    app.router.add_get("/_health", _health)
    app.router.add_post("/_fail", _fail)
    app.router.add_post("/_reset", _reset)
    app.router.add_get("/", _get_messages)
    app.router.add_get("/{tail:.*}", _get_messages)
    app.router.add_post("/{tail:.*}", _post_message)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    run_local_server(make_app(), "slack_sink", args.host, args.port)


if __name__ == "__main__":
    main()
