"""The IAM gate in front of fake-gcs-server (which has no IAM): `STORAGE_EMULATOR_HOST` points here.

Each Cloud Storage JSON API call is classified (`classify`: method -> permission on
`projects/_/buckets/<bucket>`, as Cloud Storage's "IAM permissions for JSON methods" lists them),
its caller read from `Authorization: Bearer` (`devstack.identity`), and checked against the local
IAM policy (`devstack.iam`); a refused call gets Cloud Storage's 401/403 error body, an allowed one
is proxied to fake-gcs-server with bodies streamed both ways over pooled keep-alive connections.

fake-gcs-server's finalize notifications go from it to Pub/Sub directly (not through the gate), as
Google's own service publishes them. Calls the gate cannot classify (batch, XML API) pass only for
the local operator.

    python -m devstack.gcs_gate --host 127.0.0.1 --port P --upstream http://127.0.0.1:Q [--location L]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
from collections import OrderedDict
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import aiohttp
from aiohttp import web
from yarl import URL

from devstack import iam

log = logging.getLogger("gcs-gate")

# fake-gcs-server serves with net/http's defaults (no idle timeout): the gate's own pooled
# connections are dropped after 30 s idle, long before anything on the upstream side would.
UPSTREAM_KEEPALIVE_S = 30.0
UPSTREAM_POOL = 128
CHUNK = 256 * 1024
MAX_REMEMBERED_UPLOADS = 10_000
# Hop-by-hop headers (RFC 9110 7.6.1) and what aiohttp sets itself.
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host"}

_B = r"(?P<bucket>[^/]+)"
# (HTTP methods, path regex, API method); first match wins. Object names may contain "/".
ROUTES: list[tuple[frozenset[str], re.Pattern, str]] = [(frozenset(m.split()), re.compile(rx), api) for m, rx, api in (
    ("GET", r"^/storage/v1/b$", "storage.buckets.list"),
    ("POST", r"^/storage/v1/b$", "storage.buckets.create"),
    ("POST", rf"^/storage/v1/b/(?P<src>[^/]+)/o/.+/(?:copyTo|rewriteTo)/b/{_B}/o/.+$", "storage.objects.create"),
    ("POST", rf"^/storage/v1/b/{_B}/o/.+/compose$", "storage.objects.create"),
    ("GET HEAD", rf"^/storage/v1/b/{_B}/o$", "storage.objects.list"),
    ("POST", rf"^/storage/v1/b/{_B}/o$", "storage.objects.create"),
    ("GET HEAD", rf"^/storage/v1/b/{_B}/o/.+$", "storage.objects.get"),
    ("DELETE", rf"^/storage/v1/b/{_B}/o/.+$", "storage.objects.delete"),
    ("PATCH PUT POST", rf"^/storage/v1/b/{_B}/o/.+$", "storage.objects.update"),
    ("GET", rf"^/storage/v1/b/{_B}/notificationConfigs(?:/[^/]+)?$", "storage.buckets.get"),
    ("POST DELETE", rf"^/storage/v1/b/{_B}/notificationConfigs(?:/[^/]+)?$", "storage.buckets.update"),
    ("GET", rf"^/storage/v1/b/{_B}$", "storage.buckets.get"),
    ("PATCH PUT", rf"^/storage/v1/b/{_B}$", "storage.buckets.update"),
    ("DELETE", rf"^/storage/v1/b/{_B}$", "storage.buckets.delete"),
    ("GET HEAD", rf"^/download/storage/v1/b/{_B}/o/.+$", "storage.objects.get"),
    ("POST PUT", rf"^/upload/storage/v1/b/{_B}/o$", "storage.objects.create"),
    ("POST PUT", r"^/upload/resumable/(?P<upload>[^/]+)$", "storage.objects.create"),
)]


def bucket_resource(bucket: str) -> str:
    return f"projects/_/buckets/{bucket}"


class Unclassified(Exception):
    pass


def classify(method: str, raw_path: str, query: dict[str, str], project: str,
             uploads: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """The (API method, resource) checks of one request; Unclassified when the gate cannot tell."""
    for methods, rx, api in ROUTES:
        if method not in methods:
            continue
        m = rx.match(raw_path)
        if not m:
            continue
        groups = m.groupdict()
        if api in ("storage.buckets.list", "storage.buckets.create"):
            return [(api, f"projects/{query.get('project') or project}")]
        if "upload" in groups:
            bucket = (uploads or {}).get(groups["upload"])
            if bucket is None:
                raise Unclassified(f"unknown resumable upload {groups['upload']!r}")
            return [(api, bucket_resource(bucket))]
        checks = []
        if groups.get("src"):
            checks.append(("storage.objects.get", bucket_resource(unquote(groups["src"]))))
        checks.append((api, bucket_resource(unquote(groups["bucket"]))))
        return checks
    raise Unclassified(f"{method} {raw_path} is not a Cloud Storage JSON API call the gate knows")


def upload_id(location: str) -> str:
    """The id of a resumable upload session from its `Location` (query `upload_id`, else the last
    path segment of `/upload/resumable/<id>`)."""
    parts = urlsplit(location)
    ids = parse_qs(parts.query).get("upload_id")
    if ids:
        return ids[0]
    return parts.path.rstrip("/").rsplit("/", 1)[-1] if "/upload/resumable/" in parts.path else ""


def _noun(api: str) -> str:
    if api in ("storage.buckets.create", "storage.buckets.list"):
        return "Google Cloud project"
    if api.startswith("storage.buckets.") or api == "storage.objects.list":
        return "Google Cloud Storage bucket"
    return "Google Cloud Storage object"


def storage_error(exc: iam.Denied) -> web.Response:
    """Cloud Storage's JSON error body: 401 for a missing or invalid token, 403 for a permission."""
    if exc.status == 401 and "no bearer" in exc.detail:
        message = (f"Anonymous caller does not have {exc.permission} access to the {_noun(exc.method)}. "
                   f"Permission '{exc.permission}' denied on resource (or it may not exist).")
        error = {"message": message, "domain": "global", "reason": "required",
                 "locationType": "header", "location": "Authorization"}
    elif exc.status == 401:
        message = "Invalid Credentials"
        error = {"message": message, "domain": "global", "reason": "authError",
                 "locationType": "header", "location": "Authorization"}
    else:
        message = (f"{exc.email} does not have {exc.permission} access to the {_noun(exc.method)}. "
                   f"Permission '{exc.permission}' denied on resource (or it may not exist).")
        error = {"message": message, "domain": "global", "reason": "forbidden"}
    return web.json_response({"error": {"code": exc.status, "message": message, "errors": [error]}},
                             status=exc.status)


class Gate:
    def __init__(self, upstream: str, enforcer: iam.Enforcer):
        self.upstream = upstream.rstrip("/")
        self.enforcer = enforcer
        self.project = enforcer.policy.desired.project
        self.uploads: OrderedDict[str, str] = OrderedDict()  # resumable upload id -> bucket
        self.session: aiohttp.ClientSession | None = None

    async def start(self, _app=None) -> None:
        connector = aiohttp.TCPConnector(limit=UPSTREAM_POOL, keepalive_timeout=UPSTREAM_KEEPALIVE_S)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                             timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    async def close(self, _app=None) -> None:
        if self.session:
            await self.session.close()
        self.enforcer.close()

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    def _remember_upload(self, location: str, bucket: str) -> None:
        uid = upload_id(location)
        if uid:
            self.uploads[uid] = bucket
            while len(self.uploads) > MAX_REMEMBERED_UPLOADS:
                self.uploads.popitem(last=False)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.raw_path.split("?", 1)[0]
        auth = request.headers.get("Authorization")
        try:
            checks = classify(request.method, raw_path, dict(request.query), self.project, self.uploads)
        except Unclassified as exc:
            checks = None
            reason = str(exc)
        try:
            if checks is None:
                # Only the operator (an owner) may make calls the gate cannot classify.
                email = self.enforcer.tokens.principal(auth).email if auth else ""
                if email != self.enforcer.policy.operator:
                    return web.json_response({"error": {"code": 403, "message": f"local GCS gate: {reason}",
                                                        "errors": [{"reason": "forbidden", "domain": "global",
                                                                    "message": reason}]}}, status=403)
            else:
                self.enforcer.authorize(auth, checks)
        except iam.Denied as exc:
            log.warning("iam denied", extra={"principal": exc.email or iam.UNAUTHENTICATED, "method": exc.method,
                                             "resource": exc.resource, "permission": exc.permission,
                                             "http": exc.status})
            return storage_error(exc)
        except iam.identity.TokenError as exc:
            return storage_error(iam.Denied(401, "", "storage.unclassified", "", "storage.objects.get", str(exc)))
        return await self._proxy(request, checks)

    async def _proxy(self, request: web.Request, checks) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        data = request.content if request.body_exists else None
        url = URL(self.upstream + request.raw_path, encoded=True)
        async with self.session.request(request.method, url, headers=headers, data=data,
                                        allow_redirects=False) as up:
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            location = up.headers.get("Location")
            if location and checks and up.status < 400 and request.query.get("uploadType") == "resumable":
                self._remember_upload(location, checks[-1][1].rsplit("/", 1)[-1])
            resp = web.StreamResponse(status=up.status, reason=up.reason, headers=out_headers)
            if "Content-Length" in up.headers:
                resp.content_length = int(up.headers["Content-Length"])
            await resp.prepare(request)
            if request.method != "HEAD":
                async for chunk in up.content.iter_chunked(CHUNK):
                    await resp.write(chunk)
            await resp.write_eof()
            return resp


def make_app(upstream: str, enforcer: iam.Enforcer) -> web.Application:
    gate = Gate(upstream, enforcer)
    app = web.Application(client_max_size=1024 ** 3)
    app.router.add_get("/_health", gate.health)
    app.router.add_route("*", "/{tail:.*}", gate.handle)
    app.on_startup.append(gate.start)
    app.on_cleanup.append(gate.close)
    return app


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m devstack.gcs_gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="fake-gcs-server's URL")
    p.add_argument("--location", default="us-central1", help="the local project's location")
    p.add_argument("--iam-log-dir", default="", help="where the call log goes (default: the stack's run dir)")
    return p.parse_args(argv)


async def _serve(args) -> None:
    from devstack import paths

    policy = iam.local_policy(args.location)
    log_dir = Path(args.iam_log_dir) if args.iam_log_dir else paths.RUN_DIR
    app = make_app(args.upstream, iam.Enforcer(policy, iam.CallLog(log_dir, "gcs_gate", policy)))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=1024, reuse_address=True)
    await site.start()
    log.info("gcs gate ready", extra={"port": args.port, "upstream": args.upstream,
                                      "dropped_grants": list(policy.dropped)})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv=None) -> int:
    from devstack.cloudtasks.__main__ import JsonFormatter

    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
