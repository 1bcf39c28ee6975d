"""Item handlers: handler choice, dry run, marketplace draft steps and error classification."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from shared.exceptions import LeaseLostError, PermanentItemError, RetryableItemError
from shared.handlers import DryRunHandler, ItemContext, MarketplaceDraftHandler, handler_for
from shared.handlers.errors import classify_exception, classify_response

GTIN = "00012345678905"


def ctx(**kw) -> ItemContext:
    base = dict(job_id="job-1", gtin=GTIN, upc="012345678905", line=3, round=1, attempt=1, options={})
    base.update(kw)
    return ItemContext(**base)


# --- choice and dry run --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,name",
    [
        ({"test_mode": True, "create_drafts": True}, "dry_run"),
        ({"test_mode": False, "create_drafts": True}, "marketplace_draft"),
        ({}, "dry_run"),
        (None, "dry_run"),
    ],
)
def test_handler_for_options(options, name):
    assert handler_for(options).name == name


def test_dry_run_validates_and_returns_result():
    assert DryRunHandler().handle(ctx()) == {"dry_run": True, "sku": GTIN, "kind": "UPC-A", "offer_id": None, "created": False}
    with pytest.raises(PermanentItemError) as bad:
        DryRunHandler().handle(ctx(upc="012345678906"))
    assert bad.value.code == "invalid_gtin" and "check digit" in bad.value.message and "line 3" in bad.value.message
    with pytest.raises(PermanentItemError) as mismatch:
        DryRunHandler().handle(ctx(gtin="00000000000000"))
    assert mismatch.value.code == "gtin_mismatch"


# --- classification ------------------------------------------------------------------------------


def _response(status: int, body=None, headers=None) -> requests.Response:
    r = requests.Response()
    r.status_code = status
    r._content = json.dumps(body).encode() if body is not None else b""
    r.headers.update(headers or {})
    return r


def _ebay(error_id, message):
    return {"errors": [{"errorId": error_id, "domain": "API_INVENTORY", "message": message}]}


@pytest.mark.parametrize(
    "step,status,code,retryable",
    [
        ("offer create", 400, "marketplace_rejected", False),
        ("offer create", 401, "marketplace_auth", False),
        ("offer create", 403, "marketplace_auth", False),
        ("catalog lookup", 404, "product_not_found", False),
        ("offer lookup", 404, "marketplace_not_found", False),
        ("offer create", 409, "marketplace_conflict", False),
        ("offer create", 422, "marketplace_rejected", False),
        ("offer create", 418, "marketplace_rejected", False),
        ("offer create", 429, "marketplace_rate_limited", True),
        ("offer create", 500, "marketplace_unavailable", True),
        ("offer create", 502, "marketplace_unavailable", True),
        ("offer create", 503, "marketplace_unavailable", True),
        ("offer create", 504, "marketplace_unavailable", True),
    ],
)
def test_classify_response_table(step, status, code, retryable):
    err = classify_response(step, "POST", "/sell/inventory/v1/offer", _response(status, _ebay(25001, "Their words.")))
    assert err.code == code and err.retryable is retryable
    assert isinstance(err, RetryableItemError if retryable else PermanentItemError)
    # what, where and why: the step, the call and status, and the marketplace's own message
    assert err.message.startswith(f"{step}: POST /sell/inventory/v1/offer answered {status} (errorId 25001): Their words.")
    assert "Unknown error" not in err.message


def test_classify_429_honours_retry_after_and_odd_bodies():
    err = classify_response("offer lookup", "GET", "/o", _response(429, _ebay(2001, "Too many"), {"Retry-After": "7"}))
    assert "retry after 7 s" in err.message and err.details["retry_after"] == "7"
    plain = requests.Response()
    plain.status_code, plain._content = 502, b"<html>Bad gateway</html>"
    assert "Bad gateway" in classify_response("x", "GET", "/p", plain).message
    assert "no error message" in classify_response("x", "GET", "/p", _response(500, {"weird": 1})).message


@pytest.mark.parametrize(
    "exc,code,retryable",
    [
        (requests.ConnectTimeout("c"), "marketplace_timeout", True),
        (requests.ReadTimeout("r"), "marketplace_timeout", True),
        (requests.ConnectionError("refused"), "marketplace_unavailable", True),
        (requests.exceptions.ChunkedEncodingError("cut"), "marketplace_unavailable", True),
        (KeyError("x"), "handler_crashed", True),
    ],
)
def test_classify_exception_table(exc, code, retryable):
    err = classify_exception("inventory item upsert", "PUT", "/sell/inventory/v1/inventory_item/1", exc)
    assert err.code == code and err.retryable is retryable
    assert err.message.startswith("inventory item upsert: PUT /sell/inventory/v1/inventory_item/1")


# --- marketplace handler against a scripted fake server -----------------------------------------


class Script:
    """Per-route scripted answers; records every request."""

    def __init__(self):
        self.answers: dict[tuple[str, str], list[tuple[int, dict | None]]] = {}
        self.requests: list[tuple[str, str, dict, dict | None]] = []

    def on(self, method, path, *answers):
        self.answers[(method, path)] = list(answers)

    def answer(self, method, path):
        queue = self.answers.get((method, path.split("?")[0]))
        if not queue:
            return 500, _ebay(1, f"unscripted {method} {path}")
        return queue.pop(0) if len(queue) > 1 else queue[0]


@pytest.fixture
def fake_market():
    script = Script()

    class H(BaseHTTPRequestHandler):
        def _do(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            script.requests.append((self.command, self.path, dict(self.headers), body))
            status, payload = script.answer(self.command, self.path)
            data = json.dumps(payload).encode() if payload is not None else b""
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = _do

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield script, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


PRODUCT = ("GET", f"/catalog/v1/product/{GTIN}")
INVENTORY = ("PUT", f"/sell/inventory/v1/inventory_item/{GTIN}")
OFFERS = ("GET", "/sell/inventory/v1/offer")
CREATE = ("POST", "/sell/inventory/v1/offer")


def _happy(script):
    script.on(*PRODUCT, (200, {"gtin": GTIN, "title": "Acme Widget", "brand": "Acme"}))
    script.on(*INVENTORY, (204, None))
    script.on(*OFFERS, (200, {"offers": [], "total": 0}))
    script.on(*CREATE, (201, {"offerId": "42"}))


def test_marketplace_creates_offer_with_idempotency_key(fake_market):
    script, url = fake_market
    _happy(script)
    assert MarketplaceDraftHandler(url).handle(ctx()) == {"offer_id": "42", "sku": GTIN, "created": True}
    methods = [(m, p.split("?")[0]) for m, p, _, _ in script.requests]
    assert methods == [PRODUCT, INVENTORY, OFFERS, CREATE]
    _, path, headers, body = script.requests[-1]
    assert headers["Idempotency-Key"] == f"job-1:{GTIN}"
    assert body == {"sku": GTIN, "marketplaceId": "EBAY_US", "format": "FIXED_PRICE", "availableQuantity": 1}
    assert script.requests[2][1] == f"/sell/inventory/v1/offer?sku={GTIN}"
    assert script.requests[1][3]["product"]["title"] == "Acme Widget"


def test_marketplace_existing_offer_is_not_created_again(fake_market):
    script, url = fake_market
    _happy(script)
    script.on(*OFFERS, (200, {"offers": [{"offerId": "7", "sku": GTIN}], "total": 1}))
    assert MarketplaceDraftHandler(url).handle(ctx()) == {"offer_id": "7", "sku": GTIN, "created": False}
    assert all(m != "POST" for m, *_ in script.requests)


def test_marketplace_offer_exists_answer_resolves_to_existing_offer(fake_market):
    script, url = fake_market
    _happy(script)
    script.on(*OFFERS, (200, {"offers": [], "total": 0}), (200, {"offers": [{"offerId": "9"}], "total": 1}))
    script.on(*CREATE, (400, _ebay(25002, "Offer entity already exists")))
    assert MarketplaceDraftHandler(url).handle(ctx()) == {"offer_id": "9", "sku": GTIN, "created": False}


def test_marketplace_errors_carry_their_message(fake_market):
    script, url = fake_market
    _happy(script)
    script.on(*PRODUCT, (404, _ebay(25710, "No product with this GTIN.")))
    with pytest.raises(PermanentItemError) as exc:
        MarketplaceDraftHandler(url).handle(ctx())
    assert exc.value.code == "product_not_found" and "No product with this GTIN." in exc.value.message
    script.on(*PRODUCT, (200, {}))
    script.on(*CREATE, (503, _ebay(25001, "A system error has occurred.")))
    with pytest.raises(RetryableItemError) as exc:
        MarketplaceDraftHandler(url).handle(ctx())
    assert exc.value.code == "marketplace_unavailable" and "offer create: POST /sell/inventory/v1/offer answered 503" in exc.value.message


def test_marketplace_lost_lease_stops_before_offer(fake_market):
    script, url = fake_market
    _happy(script)
    with pytest.raises(LeaseLostError):
        MarketplaceDraftHandler(url).handle(ctx(heartbeat=lambda: False))
    assert all(m != "POST" for m, *_ in script.requests)


def test_marketplace_timeout_and_refused_are_retryable(fake_market):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(RetryableItemError) as exc:
        MarketplaceDraftHandler(dead).handle(ctx())
    assert exc.value.code == "marketplace_unavailable" and "catalog lookup" in exc.value.message

    # a server that accepts but never answers
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        slow = MarketplaceDraftHandler(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=(1.0, 0.2))
        with pytest.raises(RetryableItemError) as exc:
            slow.handle(ctx())
        assert exc.value.code == "marketplace_timeout"
    finally:
        listener.close()


def test_marketplace_not_configured_is_permanent(monkeypatch):
    from shared import config

    monkeypatch.setenv("UPCFAN_MARKETPLACE_URL", "")
    config.settings.cache_clear()
    try:
        with pytest.raises(PermanentItemError) as exc:
            MarketplaceDraftHandler().handle(ctx())
        assert exc.value.code == "marketplace_not_configured"
    finally:
        config.settings.cache_clear()


# --- contract with the local sandbox marketplace (devstack), when present -------------------------


@pytest.fixture
def sandbox():
    mp = pytest.importorskip("devstack.marketplace")
    from aiohttp import web

    loop = asyncio.new_event_loop()
    app = mp.make_app(seed=1)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_sandbox_contract_one_listing_across_repeats(sandbox):
    handler = MarketplaceDraftHandler(sandbox)
    first = handler.handle(ctx())
    assert first["created"] is True and first["sku"] == GTIN
    second = handler.handle(ctx(attempt=2))
    assert second == {"offer_id": first["offer_id"], "sku": GTIN, "created": False}
    stats = requests.get(sandbox + "/_stats", timeout=5).json()
    assert stats["listings"] == 1 and stats["skus_with_duplicates"] == 0 and stats["create_calls"] == 1


def test_sandbox_contract_injected_failure_message(sandbox):
    requests.post(sandbox + "/_faults", json={"fail_gtins": {GTIN: 400}}, timeout=5).raise_for_status()
    with pytest.raises(PermanentItemError) as exc:
        MarketplaceDraftHandler(sandbox).handle(ctx())
    assert exc.value.code == "marketplace_rejected" and "Injected failure" in exc.value.message
