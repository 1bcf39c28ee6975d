"""Pub/Sub-emulator → ingest bridge: turns GCS finalize notifications into Eventarc-style CloudEvents.

fake-gcs-server publishes one JSON_API_V1 notification per finalize to a Pub/Sub emulator topic.
This process pulls them and POSTs each as a binary-mode CloudEvent
`google.cloud.storage.object.v1.finalized`, with the headers Eventarc sends, to the ingest URL.
A message is acked only after a 2xx (or a 4xx, which is logged: retrying a rejected event is
pointless); 5xx and connection errors retry with backoff, then the message is nacked so Pub/Sub
redelivers it. A message already delivered (2xx) is never delivered again (one event per finalize).
Like an Eventarc trigger, each delivery carries an ID token of the trigger's service account
(`--invoker-email`, the model's `upcfan-eventarc-invoker`) whose `aud` is the target service's URL
(`--audience`), which ingest's invoker gate (devstack/gate.py) checks as Cloud Run does.

`GET /_deliveries` lists every delivery (headers, body, attempts); `GET /_health`; `POST /_reset`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import aiohttp
from aiohttp import web

from devstack import identity
from devstack.procs import run_local_server

log = logging.getLogger("event_bridge")

EVENT_TYPE = "google.cloud.storage.object.v1.finalized"
STATE_KEY = web.AppKey("bridge", object)


def object_resource(data: dict, attributes: dict, storage_url: str = "") -> dict:
    """The GCS object JSON resource as Eventarc puts it in the event body (int64s as strings)."""
    bucket = data.get("bucket") or attributes.get("bucketId", "")
    name = data.get("name") or attributes.get("objectId", "")
    generation = str(data.get("generation") or attributes.get("objectGeneration", ""))
    res = dict(data)
    res["kind"] = "storage#object"
    res["bucket"] = bucket
    res["name"] = name
    res["generation"] = generation
    res["id"] = f"{bucket}/{name}/{generation}"
    res["metageneration"] = str(data.get("metageneration", "1"))
    res["size"] = str(data.get("size", "0"))
    res.setdefault("contentType", "application/octet-stream")
    res.setdefault("storageClass", "STANDARD")
    res.setdefault("timeCreated", data.get("updated") or attributes.get("eventTime", ""))
    res.setdefault("updated", res["timeCreated"])
    res.setdefault("timeStorageClassUpdated", res["timeCreated"])
    base = storage_url.rstrip("/") or "https://www.googleapis.com"
    res.setdefault("selfLink", f"{base}/storage/v1/b/{bucket}/o/{quote(name, safe='')}")
    res.setdefault(
        "mediaLink",
        f"{base}/download/storage/v1/b/{bucket}/o/{quote(name, safe='')}?generation={generation}&alt=media",
    )
    res.setdefault("etag", base64.b64encode(f"{generation}".encode()).decode())
    return res


def cloudevent_for(message: dict, storage_url: str = "") -> tuple[dict, dict]:
    """(headers, body) of the binary-mode CloudEvent for one Pub/Sub message."""
    attributes = message.get("attributes") or {}
    raw = base64.b64decode(message.get("data", "") or b"")
    data = json.loads(raw) if raw else {}
    body = object_resource(data, attributes, storage_url)
    ce_time = body.get("updated") or attributes.get("eventTime") or datetime.now(timezone.utc).isoformat()
    headers = {
        "ce-id": str(message.get("messageId", "")),
        "ce-source": f"//storage.googleapis.com/projects/_/buckets/{body['bucket']}",
        "ce-specversion": "1.0",
        "ce-type": EVENT_TYPE,
        "ce-subject": f"objects/{body['name']}",
        "ce-time": ce_time,
        "content-type": "application/json",
    }
    return headers, body


class Bridge:
    def __init__(
        self,
        pubsub_host: str,
        subscription: str,
        target: str,
        storage_url: str = "",
        deliveries_file: Path | None = None,
        max_attempts: int = 8,
        concurrency: int = 16,
        invoker_email: str = "",
        audience: str = "",
    ) -> None:
        self.pubsub = f"http://{pubsub_host}" if not pubsub_host.startswith("http") else pubsub_host
        self.subscription = subscription
        self.target = target
        self.storage_url = storage_url
        self.deliveries_file = deliveries_file
        self.max_attempts = max_attempts
        self.invoker_email = invoker_email
        self.audience = audience or target.rstrip("/")
        self.sem = asyncio.Semaphore(concurrency)
        self.deliveries: list[dict] = []
        self.delivered_ids: set[str] = set()
        self.in_flight: set[str] = set()
        self.pulls = 0
        self.connected = False
        self.last_error = ""
        self._tasks: set[asyncio.Task] = set()

    async def _sub_call(self, session: aiohttp.ClientSession, verb: str, payload: dict, timeout: float = 30) -> dict:
        url = f"{self.pubsub}/v1/{self.subscription}:{verb}"
        async with session.post(url, json=payload, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"pubsub {verb} -> {resp.status}: {text[:200]}")
            return json.loads(text) if text.strip() else {}

    async def _check_subscription(self, session: aiohttp.ClientSession) -> None:
        async with session.get(
            f"{self.pubsub}/v1/{self.subscription}", timeout=aiohttp.ClientTimeout(total=5)
        ) as resp:
            if resp.status != 200:
                raise RuntimeError(f"subscription {self.subscription}: {resp.status} {(await resp.text())[:200]}")
        self.connected = True

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            idle = 0.02
            while True:
                try:
                    if not self.connected:
                        await self._check_subscription(session)
                    # Not a long poll: the emulator hands messages to a pull the client already gave
                    # up on (until their ack deadline expires), so ask and come back shortly instead.
                    out = await self._sub_call(
                        session, "pull", {"maxMessages": 100, "returnImmediately": True}, timeout=30
                    )
                    self.pulls += 1
                    received = out.get("receivedMessages") or []
                    for rm in received:
                        task = asyncio.create_task(self._handle(session, rm))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                    idle = 0.02 if received else min(idle * 2, 0.2)
                    if not received:
                        await asyncio.sleep(idle)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # emulator restarting or not up yet
                    self.connected = False
                    self.last_error = repr(exc)
                    log.warning("pull failed: %r", exc)
                    await asyncio.sleep(0.5)

    async def _handle(self, session: aiohttp.ClientSession, rm: dict) -> None:
        ack_id = rm["ackId"]
        message = rm.get("message") or {}
        msg_id = str(message.get("messageId", ""))
        attributes = message.get("attributes") or {}
        if attributes.get("eventType", "OBJECT_FINALIZE") != "OBJECT_FINALIZE":
            await self._ack(session, ack_id)
            return
        if msg_id in self.delivered_ids:
            await self._ack(session, ack_id)  # redelivery after a lost ack: already handed over
            return
        if msg_id in self.in_flight:
            return  # the first copy is still being delivered; this one expires and is redelivered
        self.in_flight.add(msg_id)
        try:
            async with self.sem:
                await self._deliver(session, ack_id, message)
        finally:
            self.in_flight.discard(msg_id)

    async def _deliver(self, session: aiohttp.ClientSession, ack_id: str, message: dict) -> None:
        headers, body = cloudevent_for(message, self.storage_url)
        entry = {
            "id": headers["ce-id"],
            "bucket": body["bucket"],
            "name": body["name"],
            "generation": body["generation"],
            "target": self.target,
            "headers": headers,
            "body": body,
            "attempts": [],
            "outcome": "pending",
            "first_attempt_at": time.time(),
        }
        self.deliveries.append(entry)
        delay = 0.5
        payload = json.dumps(body).encode()
        for attempt in range(1, self.max_attempts + 1):
            status: int | str
            try:
                async with session.post(
                    self.target, data=payload, headers={**headers, **self._auth()},
                    timeout=aiohttp.ClientTimeout(total=60),
                ) as resp:
                    status = resp.status
                    text = (await resp.text())[:300]
            except Exception as exc:
                status, text = "error", repr(exc)[:300]
            entry["attempts"].append({"at": time.time(), "status": status, "response": text})
            if isinstance(status, int) and 200 <= status < 300:
                entry["outcome"] = "delivered"
                self.delivered_ids.add(entry["id"])
                await self._ack(session, ack_id)
                break
            if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
                entry["outcome"] = "rejected"
                log.warning("ingest rejected event %s (%s/%s): %s %s", entry["id"], entry["bucket"], entry["name"], status, text)
                self.delivered_ids.add(entry["id"])
                await self._ack(session, ack_id)
                break
            if attempt < self.max_attempts:
                await self._extend(session, ack_id, 60)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        else:
            entry["outcome"] = "nacked"
            log.warning("giving event %s back to Pub/Sub after %d attempts", entry["id"], self.max_attempts)
            await self._extend(session, ack_id, 0)
        entry["finished_at"] = time.time()
        self._record(entry)

    def _auth(self) -> dict[str, str]:
        """The trigger's ID token (fresh per attempt; none without an invoker email)."""
        if not self.invoker_email:
            return {}
        token = identity.mint(self.invoker_email, self.audience, ttl_s=identity.ID_TOKEN_TTL_S,
                              issuer=identity.GOOGLE_ISSUER)
        return {"Authorization": f"Bearer {token}"}

    async def _ack(self, session: aiohttp.ClientSession, ack_id: str) -> None:
        try:
            await self._sub_call(session, "acknowledge", {"ackIds": [ack_id]})
        except Exception as exc:
            log.warning("ack failed: %r", exc)

    async def _extend(self, session: aiohttp.ClientSession, ack_id: str, seconds: int) -> None:
        try:
            await self._sub_call(session, "modifyAckDeadline", {"ackIds": [ack_id], "ackDeadlineSeconds": seconds})
        except Exception as exc:
            log.warning("modifyAckDeadline failed: %r", exc)

    def _record(self, entry: dict) -> None:
        line = json.dumps({k: v for k, v in entry.items()}, default=str)
        print(line, flush=True)
        if self.deliveries_file:
            with self.deliveries_file.open("a") as fh:
                fh.write(line + "\n")


async def _deliveries(request: web.Request) -> web.Response:
    bridge: Bridge = request.app[STATE_KEY]
    items = bridge.deliveries
    name = request.query.get("name")
    if name:
        items = [d for d in items if d["name"] == name]
    return web.json_response({"deliveries": items, "total": len(items)})


async def _health(request: web.Request) -> web.Response:
    bridge: Bridge = request.app[STATE_KEY]
    ok = bridge.connected
    body = {
        "ok": ok,
        "component": "event_bridge",
        "pulls": bridge.pulls,
        "in_flight": len(bridge.in_flight),
        "last_error": bridge.last_error,
    }
    return web.json_response(body, status=200 if ok else 503)


async def _reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].deliveries.clear()
    return web.json_response({"ok": True})


def make_app(bridge: Bridge) -> web.Application:
    app = web.Application()
    app[STATE_KEY] = bridge

    async def start_loop(app: web.Application):
        task = asyncio.create_task(bridge.run())
        yield
        task.cancel()

    app.cleanup_ctx.append(start_loop)
    app.router.add_get("/_deliveries", _deliveries)
    app.router.add_get("/_health", _health)
    app.router.add_post("/_reset", _reset)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="GCS notification → CloudEvent bridge")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pubsub", required=True, help="Pub/Sub emulator host:port")
    parser.add_argument("--subscription", required=True, help="projects/P/subscriptions/S")
    parser.add_argument("--target", required=True, help="URL the CloudEvents are POSTed to")
    parser.add_argument("--storage-url", default="", help="GCS emulator URL for selfLink/mediaLink")
    parser.add_argument("--deliveries-file", type=Path, default=None)
    parser.add_argument("--max-attempts", type=int, default=8)
    parser.add_argument("--invoker-email", default="", help="the trigger's service account (sends its ID token)")
    parser.add_argument("--audience", default="", help="the ID token's aud (default: the target without a trailing /)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    bridge = Bridge(
        args.pubsub, args.subscription, args.target, args.storage_url, args.deliveries_file, args.max_attempts,
        invoker_email=args.invoker_email, audience=args.audience,
    )
    run_local_server(make_app(bridge), "event_bridge", args.host, args.port)


if __name__ == "__main__":
    main()
