"""`upcfan console`'s local proxy against a small upstream on loopback: token added, credentials and foreign
Hosts refused, streamed bodies passed through, and the gcloud token renewed before it expires."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from upcfan_cli.console_proxy import GCLOUD_TOKEN_TTL_S, ConsoleProxy, GcloudIdentityToken, StaticToken


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/csv")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (b"a,b\n", b"1,2\n"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        body = json.dumps({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def proxy():
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    p = ConsoleProxy(f"http://127.0.0.1:{upstream.server_address[1]}/", StaticToken("tok-1")).start()
    yield p
    p.stop()
    upstream.shutdown()
    upstream.server_close()


def _request(proxy, method, path, headers=None, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, dict(resp.getheaders()), resp.read()


def test_forwards_with_the_operators_token_and_drops_the_callers_credentials(proxy):
    status, _, body = _request(proxy, "POST", "/api/batch/jobs/j/cancel?x=1", body=b"{}",
                               headers={"Authorization": "Bearer someone-else", "Cookie": "s=1",
                                        "Origin": f"http://127.0.0.1:{proxy.port}", "X-Upcfan-Console": "1"})
    seen = json.loads(body)
    assert status == 201 and seen["path"] == "/api/batch/jobs/j/cancel?x=1"
    assert seen["headers"]["authorization"] == "Bearer tok-1" and "cookie" not in seen["headers"]
    assert seen["headers"]["origin"] == f"http://127.0.0.1:{proxy.port}"  # the api judges forgery by it
    assert seen["headers"]["x-upcfan-console"] == "1"


def test_streams_a_chunked_body_through(proxy):
    status, headers, body = _request(proxy, "GET", "/stream")
    assert status == 200 and body == b"a,b\n1,2\n" and headers["Content-Type"] == "text/csv"


def test_refuses_a_request_for_another_host(proxy):
    status, _, body = _request(proxy, "GET", "/", headers={"Host": "rebound.example:80"})
    assert status == 403 and b"only http://127.0.0.1" in body
    assert _request(proxy, "GET", "/", headers={"Host": f"localhost:{proxy.port}"})[0] == 201


def test_unreachable_api_is_a_502_naming_it():
    p = ConsoleProxy("http://127.0.0.1:9/", StaticToken("t")).start()
    try:
        status, _, body = _request(p, "GET", "/")
        assert status == 502 and b"the api is unreachable" in body
    finally:
        p.stop()


def test_bad_upstream_url_is_refused():
    with pytest.raises(ValueError, match="http"):
        ConsoleProxy("127.0.0.1:8100", StaticToken("t"))


def test_gcloud_token_is_taken_once_and_renewed_before_an_hour():
    calls, now = [], [0.0]

    def run(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout=f"id-token-{len(calls)}\n", stderr="")

    token = GcloudIdentityToken(run=run, clock=lambda: now[0])
    assert token() == token() == "id-token-1" and calls == [["gcloud", "auth", "print-identity-token"]]
    now[0] = GCLOUD_TOKEN_TTL_S + 1
    assert token() == "id-token-2"


def test_gcloud_failure_says_what_to_do():
    token = GcloudIdentityToken(run=lambda argv, **kw: subprocess.CompletedProcess(argv, 1, "", "not logged in"))
    with pytest.raises(RuntimeError, match="gcloud auth login"):
        token()
