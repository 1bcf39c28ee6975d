"""Local Slack webhook sink: stores messages, fails on demand like Slack does (500, 429 + Retry-After)."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
import requests
from aiohttp import web

from devstack.slack_sink import make_app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sink():
    port = _free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(), access_log=None)
    ready = threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(10)
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)


def test_post_stores_message_with_receive_time(sink):
    msg = {"text": "stall <b> & co", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "x"}}]}
    r = requests.post(sink + "/services/T000/B000/XXX", json=msg, timeout=10)
    assert r.status_code == 200 and r.text == "ok"
    got = requests.get(sink + "/", timeout=10).json()["messages"]
    assert len(got) == 1
    assert got[0]["text"] == msg["text"] and got[0]["blocks"] == msg["blocks"]
    assert got[0]["received_at"] and got[0]["received_ts"] > 0
    assert got[0]["path"] == "/services/T000/B000/XXX"


def test_rejects_what_slack_rejects(sink):
    assert requests.post(sink + "/", data=b"not json", timeout=10).text == "invalid_payload"
    empty = requests.post(sink + "/", json={"username": "x"}, timeout=10)
    assert empty.status_code == 400 and empty.text == "no_text"
    assert requests.get(sink + "/", timeout=10).json()["messages"] == []


def test_fail_next_n_posts_then_recover(sink):
    requests.post(sink + "/_fail", json={"status": 500, "count": 2}, timeout=10)
    assert requests.post(sink + "/", json={"text": "a"}, timeout=10).status_code == 500
    assert requests.post(sink + "/", json={"text": "b"}, timeout=10).status_code == 500
    assert requests.post(sink + "/", json={"text": "c"}, timeout=10).status_code == 200
    body = requests.get(sink + "/", timeout=10).json()
    assert [m["text"] for m in body["messages"]] == ["c"]
    assert body["failed_posts"] == 2


def test_rate_limited_with_retry_after(sink):
    requests.post(sink + "/_fail", json={"status": 429, "count": 1, "retry_after": 7}, timeout=10)
    r = requests.post(sink + "/", json={"text": "a"}, timeout=10)
    assert r.status_code == 429 and r.headers["Retry-After"] == "7"
    assert requests.post(sink + "/", json={"text": "a"}, timeout=10).status_code == 200


def test_reset(sink):
    requests.post(sink + "/", json={"text": "a"}, timeout=10)
    requests.post(sink + "/_fail", json={"status": 500, "count": 5}, timeout=10)
    requests.post(sink + "/_reset", timeout=10)
    assert requests.get(sink + "/", timeout=10).json()["messages"] == []
    assert requests.post(sink + "/", json={"text": "b"}, timeout=10).status_code == 200


def test_slack_sdk_webhook_client_works_against_it(sink):
    from slack_sdk.webhook import WebhookClient

    resp = WebhookClient(sink + "/hook").send(text="hello", blocks=[{"type": "divider"}])
    assert resp.status_code == 200 and resp.body == "ok"
    assert requests.get(sink + "/", timeout=10).json()["messages"][0]["text"] == "hello"
