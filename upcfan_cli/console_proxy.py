"""`upcfan console`'s authenticated local proxy: a browser on this machine reaches the IAM-private api function.

A browser cannot mint Google ID tokens, and the api accepts no request without one (Cloud Run's
invoker check; locally devstack/gate.py). The proxy listens on 127.0.0.1 only and adds the operator's
ID token to every request it forwards, so the api sees, and records as the actor, the operator's own
verified email. Requests naming any other Host are refused: a page of another site that gets its name
resolved to 127.0.0.1 (DNS rebinding) cannot borrow the operator's credentials. Cross-site POSTs are
the api's to refuse (functions/api/console_pages.py), so Origin and Sec-Fetch-* pass through.
"""

from __future__ import annotations

import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

import requests

from shared.log import log_event

# Not forwarded: hop-by-hop headers, and the credentials a request may carry (only the proxy's count).
_DROP_REQUEST = frozenset({"host", "connection", "keep-alive", "proxy-authorization", "proxy-connection", "te",
                           "trailer", "transfer-encoding", "upgrade", "authorization", "x-serverless-authorization",
                           "cookie", "content-length"})
_DROP_RESPONSE = frozenset({"connection", "keep-alive", "transfer-encoding", "trailer", "upgrade",
                            "content-length"})
UPSTREAM_TIMEOUT_S = 90.0  # longer than the api function's own 60 s timeout
GCLOUD_TOKEN_TTL_S = 45 * 60  # gcloud's ID tokens last an hour; take a new one well before


class StaticToken:
    """A token known up front: the local stack's operator token (UPCFAN_OPERATOR_TOKEN in stack.env)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the operator token is empty")
        self._token = token

    def __call__(self) -> str:
        return self._token


class GcloudIdentityToken:
    """The signed-in gcloud account's ID token (`gcloud auth print-identity-token`), renewed before it expires.
    Cloud Run accepts it from an account that holds roles/run.invoker on the service."""

    def __init__(self, run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._run, self._clock = run, clock
        self._token, self._at = "", float("-inf")
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            if not self._token or self._clock() - self._at > GCLOUD_TOKEN_TTL_S:
                try:
                    out = self._run(["gcloud", "auth", "print-identity-token"], capture_output=True, text=True,
                                    timeout=60)
                except FileNotFoundError:
                    raise RuntimeError("gcloud is not installed: it signs the console's requests "
                                       "(or use `gcloud run services proxy`, see docs/operations.md)") from None
                if out.returncode != 0 or not out.stdout.strip():
                    raise RuntimeError(f"gcloud auth print-identity-token failed: {out.stderr.strip()[:300]} "
                                       "(run `gcloud auth login`)")
                self._token, self._at = out.stdout.strip(), self._clock()
            return self._token


class ConsoleProxy:
    """Serves http://127.0.0.1:PORT/ → `upstream` with `Authorization: Bearer <token()>` added."""

    def __init__(self, upstream: str, token: Callable[[], str], port: int = 0, host: str = "127.0.0.1") -> None:
        parts = urlsplit(upstream)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"the api's URL must be http(s)://host[:port], got {upstream!r}")
        self.upstream = upstream.rstrip("/")
        self._token = token
        self._session = requests.Session()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy._forward(self)

            do_POST = do_HEAD = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

            def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
                pass  # one structured line per request instead (_forward)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host, self.port = host, self._server.server_address[1]
        self._allowed_hosts = {f"{host}:{self.port}", f"localhost:{self.port}"}
        self._thread: threading.Thread | None = None
        self._served = False  # shutdown() waits for a serve_forever loop, so only after one ran

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> "ConsoleProxy":
        self._served = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="console-proxy", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._served = True
        self._server.serve_forever()

    def stop(self) -> None:
        if self._served:
            self._server.shutdown()
        self._server.server_close()
        self._session.close()

    def _refuse(self, handler: BaseHTTPRequestHandler, status: int, message: str) -> None:
        body = message.encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "text/plain; charset=utf-8")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.headers.get("Host", "") not in self._allowed_hosts:
            log_event("console_proxy_refused", severity="WARNING", reason="host",
                      host=(handler.headers.get("Host") or "")[:100])
            return self._refuse(handler, 403, f"this proxy serves only {self.url}")
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _DROP_REQUEST}
        try:
            headers["Authorization"] = f"Bearer {self._token()}"
            upstream = self._session.request(handler.command, self.upstream + handler.path, headers=headers,
                                             data=body, stream=True, allow_redirects=False,
                                             timeout=UPSTREAM_TIMEOUT_S)
        except (requests.RequestException, RuntimeError) as exc:
            log_event("console_proxy_upstream_error", severity="ERROR", method=handler.command,
                      path=handler.path[:200], error=f"{type(exc).__name__}: {exc}"[:300])
            return self._refuse(handler, 502, f"the api is unreachable: {type(exc).__name__}: {exc}"[:500])
        with upstream:
            handler.send_response(upstream.status_code)
            for key, value in upstream.raw.headers.items():
                if key.lower() not in _DROP_RESPONSE:
                    handler.send_header(key, value)
            handler.end_headers()  # HTTP/1.0: the body ends when the connection closes (streams, e.g. CSV)
            if handler.command != "HEAD":
                for chunk in upstream.raw.stream(64 * 1024, decode_content=False):
                    handler.wfile.write(chunk)
        # Forwarded requests are not logged here (the page refreshes every few seconds); the api logs what
        # changes anything, with the actor. Refusals and upstream errors above are.
