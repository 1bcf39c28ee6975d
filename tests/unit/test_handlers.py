"""Item handlers: the registry and handler choice, dry run, marketplace draft steps and error classification."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from shared.config import parse_bool
from shared.exceptions import BadRequestError, LeaseLostError, PermanentItemError, RetryableItemError
from shared.handlers import (DryRunHandler, HandlerChoice, ItemContext, ItemHandler, MarketplaceDraftHandler, handler_for,
                             handler_named, known_handler_names, register)
from shared.handlers.choice import choose_handler, job_handler_name
from shared.handlers.errors import classify_exception, classify_response

GTIN = "00012345678905"


def ctx(**kw) -> ItemContext:
    base = dict(job_id="job-1", gtin=GTIN, upc="012345678905", line=3, round=1, attempt=1, options={})
    base.update(kw)
    return ItemContext(**base)


# --- the registry and the handler choice ---------------------------------------------------------

FLAGS = (None, True, False)


def _old_rule(request, metadata, default) -> str:
    """The choice before handlers had names, verbatim: per boolean request > metadata > default, then
    test_mode wins, create_drafts → marketplace, neither → dry run (resolve_options + handler_for)."""
    test = request[0] if request[0] is not None else metadata[0]
    drafts = request[1] if request[1] is not None else metadata[1]
    test = default[0] if test is None else test
    drafts = default[1] if drafts is None else drafts
    options = {"create_drafts": bool(drafts) and not test, "test_mode": bool(test)}
    if options.get("test_mode"):
        return "dry_run"
    return "marketplace_draft" if options.get("create_drafts") else "dry_run"


def _levels():
    """Every (request, metadata) pair of deprecated booleans, each None/True/False."""
    pairs = list(itertools.product(FLAGS, FLAGS))
    return itertools.product(pairs, pairs)


@pytest.mark.parametrize(
    "options,name",
    [
        ({"test_mode": True, "create_drafts": True}, "dry_run"),
        ({"test_mode": False, "create_drafts": True}, "marketplace_draft"),
        ({"test_mode": False, "create_drafts": False}, "dry_run"),
        ({"create_drafts": True}, "marketplace_draft"),
        ({}, "dry_run"),
        (None, "dry_run"),
        ({"handler": "marketplace_draft"}, "marketplace_draft"),
        ({"handler": "dry_run"}, "dry_run"),
    ],
)
def test_handler_for_options(options, name):
    """Jobs written before names (only the booleans) resolve exactly as before; new jobs name their handler."""
    assert handler_for(options).name == name
    assert handler_for(options) is handler_named(name)


def test_known_handlers_are_registered_under_their_names():
    assert known_handler_names() == ["dry_run", "marketplace_draft"]
    assert isinstance(handler_named("dry_run"), DryRunHandler)
    assert isinstance(handler_named("marketplace_draft"), MarketplaceDraftHandler)


def test_deprecated_booleans_choose_as_before_at_every_level():
    """All 324 combinations of request, metadata and configured-default booleans."""
    for (request, metadata), default in itertools.product(_levels(), itertools.product((True, False), repeat=2)):
        chosen = choose_handler(HandlerChoice(None, *request), HandlerChoice(None, *metadata), HandlerChoice(None, *default))
        assert chosen == _old_rule(request, metadata, default), (request, metadata, default)


@pytest.mark.parametrize("name,flags", [("dry_run", (True, False)), ("marketplace_draft", (False, True))])
def test_a_named_default_chooses_as_the_booleans_it_replaces(name, flags):
    """UPCFAN_DEFAULT_HANDLER=dry_run is the shipped default (test mode on, no drafts); marketplace_draft is the
    local stack's old UPCFAN_DEFAULT_TEST_MODE=false + UPCFAN_DEFAULT_CREATE_DRAFTS=true."""
    for request, metadata in _levels():
        levels = (HandlerChoice(None, *request), HandlerChoice(None, *metadata))
        assert choose_handler(*levels, HandlerChoice(name)) == _old_rule(request, metadata, flags), (request, metadata)


def test_a_name_decides_its_level_and_those_below():
    request, metadata = HandlerChoice("marketplace_draft"), HandlerChoice("dry_run")
    assert choose_handler(request, metadata, HandlerChoice("dry_run")) == "marketplace_draft"
    assert choose_handler(HandlerChoice(), metadata, HandlerChoice("marketplace_draft")) == "dry_run"
    assert choose_handler(HandlerChoice(), HandlerChoice(), HandlerChoice("marketplace_draft")) == "marketplace_draft"
    # A name beats its own level's deprecated booleans ...
    assert choose_handler(HandlerChoice("marketplace_draft", test_mode=True), HandlerChoice("dry_run")) == "marketplace_draft"
    # ... while a boolean from a higher level overrides its half of a built-in handler named below it.
    assert choose_handler(HandlerChoice(test_mode=True), HandlerChoice("marketplace_draft")) == "dry_run"
    assert choose_handler(HandlerChoice(create_drafts=False), HandlerChoice("marketplace_draft")) == "dry_run"
    assert choose_handler(HandlerChoice(test_mode=False), HandlerChoice("marketplace_draft")) == "marketplace_draft"
    assert choose_handler(HandlerChoice(test_mode=False, create_drafts=True), HandlerChoice("dry_run")) == "marketplace_draft"


def test_unknown_handler_is_a_400_listing_the_known_names():
    with pytest.raises(BadRequestError) as err:
        choose_handler(HandlerChoice(), HandlerChoice("nope", source="object metadata upcfan-handler"))
    assert err.value.code == "unknown_handler" and err.value.http_status == 400
    assert "'nope'" in err.value.message and "dry_run, marketplace_draft" in err.value.message
    assert "object metadata upcfan-handler" in err.value.message
    with pytest.raises(BadRequestError) as err:
        handler_named("nope")
    assert err.value.code == "unknown_handler"


def test_object_metadata_choice_round_trips():
    meta = HandlerChoice.from_metadata({"upcfan-handler": " marketplace_draft ", "upcfan-test-mode": "TRUE",
                                        "upcfan-create-drafts": "0"})
    assert (meta.handler, meta.test_mode, meta.create_drafts) == ("marketplace_draft", True, False)
    assert HandlerChoice.from_metadata({"upcfan-handler": "", "upcfan-test-mode": "maybe"}) == HandlerChoice(
        None, False, None, source="object metadata upcfan-handler")
    assert HandlerChoice.from_metadata(None) == HandlerChoice(source="object metadata upcfan-handler")
    assert HandlerChoice("dry_run", test_mode=True, create_drafts=False).as_metadata() == {
        "upcfan-handler": "dry_run", "upcfan-create-drafts": "false", "upcfan-test-mode": "true"}
    assert HandlerChoice().as_metadata() == {}


@pytest.mark.parametrize("raw,value", [("1", True), ("true", True), (" Yes ", True), ("ON", True), ("0", False),
                                       ("false", False), ("", False), ("maybe", False), (True, True)])
def test_parse_bool_is_the_one_reading_of_a_boolean_as_text(raw, value):
    assert parse_bool(raw) is value


@pytest.mark.parametrize("env,name", [
    ({"UPCFAN_DEFAULT_HANDLER": "marketplace_draft"}, "marketplace_draft"),
    ({"UPCFAN_DEFAULT_HANDLER": "dry_run", "UPCFAN_DEFAULT_TEST_MODE": "false",
      "UPCFAN_DEFAULT_CREATE_DRAFTS": "true"}, "dry_run"),
])
def test_configured_default_handler(monkeypatch, env, name):
    """UPCFAN_DEFAULT_HANDLER decides; the deprecated UPCFAN_DEFAULT_TEST_MODE/CREATE_DRAFTS are no longer read."""
    from shared import config

    for key in ("UPCFAN_DEFAULT_HANDLER", "UPCFAN_DEFAULT_TEST_MODE", "UPCFAN_DEFAULT_CREATE_DRAFTS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config.settings.cache_clear()
    try:
        assert config.settings().default_handler == env.get("UPCFAN_DEFAULT_HANDLER")
        assert job_handler_name(HandlerChoice(), {}) == name
        assert job_handler_name(HandlerChoice(test_mode=True), {}) == "dry_run"
    finally:
        config.settings.cache_clear()


@pytest.mark.parametrize("env", [{}, {"UPCFAN_DEFAULT_TEST_MODE": "false", "UPCFAN_DEFAULT_CREATE_DRAFTS": "true"}])
def test_an_unset_default_handler_never_silently_means_dry_run(monkeypatch, env):
    """Issue 14, defect 9: with UPCFAN_DEFAULT_HANDLER unset a dropped file ran as a dry run, silently.
    Now a choice that needs the default fails naming the variable; a choice made above it still works."""
    from shared import config

    for key in ("UPCFAN_DEFAULT_HANDLER", "UPCFAN_DEFAULT_TEST_MODE", "UPCFAN_DEFAULT_CREATE_DRAFTS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config.settings.cache_clear()
    try:
        with pytest.raises(config.SettingsError, match="UPCFAN_DEFAULT_HANDLER is not set"):
            job_handler_name(HandlerChoice(), {})
        assert job_handler_name(HandlerChoice("marketplace_draft"), {}) == "marketplace_draft"
        assert job_handler_name(HandlerChoice(test_mode=True), {}) == "dry_run"
        assert job_handler_name(HandlerChoice(), {"upcfan-handler": "dry_run"}) == "dry_run"
    finally:
        config.settings.cache_clear()


class EchoHandler(ItemHandler):
    """A handler added by this test: its class, and one `register` line."""

    name = "echo"

    def handle(self, item: ItemContext) -> dict:
        return {"echo": item.upc}


def test_a_new_handler_is_its_module_and_one_registry_line(monkeypatch):
    from shared.gcs import GcsObject
    from shared.handlers import registry
    from shared.ingest import resolve_options
    from shared.process_request import ProcessFileRequest

    monkeypatch.setattr(registry, "_HANDLERS", dict(registry._HANDLERS))
    register(EchoHandler)

    # The request names it; the schema lists it; ingest records it; the worker's one call runs it.
    request = ProcessFileRequest(gcs_path="gs://bkt/f.txt", handler="echo")
    assert ProcessFileRequest.model_json_schema()["properties"]["handler"]["anyOf"][0]["enum"] == [
        "dry_run", "echo", "marketplace_draft"]
    obj = GcsObject(bucket="bkt", name="f.txt", generation=1, size=13)
    options = resolve_options(obj, request.handler_choice)
    assert options == {"handler": "echo"}
    assert handler_for(options).handle(ctx()) == {"echo": "012345678905"}
    # By object metadata as well, and over the deprecated booleans of lower levels.
    obj.metadata = {"upcfan-handler": "echo"}
    assert resolve_options(obj) == {"handler": "echo"}
    assert choose_handler(HandlerChoice(), HandlerChoice("echo"), HandlerChoice(test_mode=False, create_drafts=True)) == "echo"
    # test_mode=true above any handler still means a dry run.
    assert choose_handler(HandlerChoice(test_mode=True), HandlerChoice("echo")) == "dry_run"


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
        ("offer create", 401, "marketplace_unauthorized", False),
        ("offer create", 403, "marketplace_unauthorized", False),
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
    """Per-route scripted answers, (status, body) or (status, body, headers); records every request."""

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
            status, payload, *extra = script.answer(self.command, self.path)
            data = json.dumps(payload).encode() if payload is not None else b""
            self.send_response(status)
            for name, value in (extra[0] if extra else {}).items():
                self.send_header(name, value)
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


def _no_sleep(_seconds: float) -> None:
    """The in-attempt retry's sleep, skipped: these tests are about what a call's fault becomes."""


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
        MarketplaceDraftHandler(url, sleep=_no_sleep).handle(ctx())
    assert exc.value.code == "marketplace_unavailable" and "offer create: POST /sell/inventory/v1/offer answered 503" in exc.value.message


def test_marketplace_lost_lease_stops_before_any_side_effect(fake_market):
    """Issue 15: the inventory upsert ran before the existing-offer check and without a lease check."""
    script, url = fake_market
    _happy(script)
    with pytest.raises(LeaseLostError):
        MarketplaceDraftHandler(url).handle(ctx(heartbeat=lambda: False))
    assert [m for m, *_ in script.requests] == ["GET"]  # the catalog lookup only: no PUT, no POST


def test_marketplace_lease_lost_between_upsert_and_offer(fake_market):
    script, url = fake_market
    _happy(script)
    beats = iter([True, False])
    with pytest.raises(LeaseLostError):
        MarketplaceDraftHandler(url).handle(ctx(heartbeat=lambda: next(beats)))
    assert [(m, p.split("?")[0]) for m, p, _, _ in script.requests] == [PRODUCT, INVENTORY, OFFERS]


# --- in-attempt retries (issue 15: 30% 503 per call failed 10% of items after 8 attempts) ---------


class FakeClock:
    """Monotonic time that moves only when the retry loop sleeps."""

    def __init__(self):
        self.t = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


def _retrying(url, clock: FakeClock) -> MarketplaceDraftHandler:
    return MarketplaceDraftHandler(url, sleep=clock.sleep, clock=clock)


UNAVAILABLE = (503, _ebay(25001, "A system error has occurred."))


def test_every_call_is_retried_in_place_on_transient_answers(fake_market, caplog):
    import logging

    script, url = fake_market
    _happy(script)
    script.on(*PRODUCT, UNAVAILABLE, (502, None), (200, {"title": "t"}))
    script.on(*INVENTORY, (500, None), (204, None))
    script.on(*OFFERS, (504, None), (200, {"offers": [], "total": 0}))
    script.on(*CREATE, UNAVAILABLE, (201, {"offerId": "42"}))
    clock = FakeClock()
    caplog.set_level(logging.INFO)
    assert _retrying(url, clock).handle(ctx(deadline=clock.t + 75)) == {"offer_id": "42", "sku": GTIN, "created": True}
    assert [(m, p.split("?")[0]) for m, p, _, _ in script.requests] == [PRODUCT] * 3 + [INVENTORY] * 2 + [OFFERS] * 2 + [CREATE] * 2
    # the replayed POST carries the same Idempotency-Key: the marketplace cannot list twice
    assert {h["Idempotency-Key"] for m, _, h, _ in script.requests if m == "POST"} == {f"job-1:{GTIN}"}
    logged = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "outbound_retry"]
    assert {r.levelname for r in logged} == {"WARNING"}
    retries = [r.fields for r in logged]
    assert [(f["step"], f["status"], f["attempt"]) for f in retries] == [
        ("catalog lookup", 503, 1), ("catalog lookup", 502, 2), ("inventory item upsert", 500, 1),
        ("offer lookup", 504, 1), ("offer create", 503, 1)]
    assert [f["wait_s"] for f in retries] == [round(w, 3) for w in clock.sleeps]
    # jittered exponential backoff: each wait within [10%, 100%] of 0.2 s doubling
    assert all(0.02 <= w <= 0.2 for i, w in enumerate(clock.sleeps) if i != 1) and 0.04 <= clock.sleeps[1] <= 0.4
    assert all(f["job_id"] == "job-1" and f["gtin"] == GTIN and f["time_left_s"] <= 75 for f in retries)


def test_retry_after_is_the_least_wait_in_seconds_or_as_an_http_date(fake_market):
    import email.utils

    script, url = fake_market
    _happy(script)
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    script.on(*PRODUCT, (429, _ebay(2001, "Too many"), {"Retry-After": "7"}), (200, {}))
    script.on(*OFFERS, (503, None, {"Retry-After": later}), (200, {"offers": [], "total": 0}))
    clock = FakeClock()
    assert _retrying(url, clock).handle(ctx(deadline=clock.t + 75))["created"] is True
    assert clock.sleeps[0] == 7.0
    assert 28.0 <= clock.sleeps[1] <= 30.0


def test_a_retry_that_would_pass_the_budget_is_not_made(fake_market):
    script, url = fake_market
    _happy(script)
    script.on(*INVENTORY, (429, _ebay(2001, "Too many"), {"Retry-After": "40"}), (204, None))
    clock = FakeClock()
    # 50 s left: a 40 s wait plus one call's 13 s timeout does not fit, so the 429 is the attempt's answer
    with pytest.raises(RetryableItemError) as exc:
        _retrying(url, clock).handle(ctx(deadline=clock.t + 50))
    assert exc.value.code == "marketplace_rate_limited" and "stopped by its time budget" in exc.value.message
    assert clock.sleeps == [] and [m for m, *_ in script.requests] == ["GET", "PUT"]


def test_retries_stop_inside_the_budget_in_an_outage(fake_market):
    script, url = fake_market
    _happy(script)
    script.on(*PRODUCT, UNAVAILABLE)  # every lookup answers 503
    clock = FakeClock()
    start = clock.t
    with pytest.raises(RetryableItemError) as exc:
        _retrying(url, clock).handle(ctx(deadline=start + 30))
    assert exc.value.code == "marketplace_unavailable"
    # every retried call could still end (at its 13 s timeout) by the deadline
    assert clock.t + 13.0 <= start + 30
    assert len(script.requests) == len(clock.sleeps) + 1 >= 3


def test_no_call_starts_without_time_for_it(fake_market):
    script, url = fake_market
    _happy(script)
    clock = FakeClock()
    with pytest.raises(RetryableItemError) as exc:
        _retrying(url, clock).handle(ctx(deadline=clock.t + 5))
    assert exc.value.code == "attempt_budget_spent" and "catalog lookup" in exc.value.message
    assert script.requests == []


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_a_4xx_other_than_429_is_not_retried(fake_market, status):
    script, url = fake_market
    _happy(script)
    script.on(*INVENTORY, (status, _ebay(25709, "Invalid value.")), (204, None))
    clock = FakeClock()
    with pytest.raises(PermanentItemError):
        _retrying(url, clock).handle(ctx(deadline=clock.t + 75))
    assert clock.sleeps == [] and [m for m, *_ in script.requests] == ["GET", "PUT"]


@pytest.mark.parametrize("route,step", [(INVENTORY, "inventory item upsert"), (CREATE, "offer create")])
def test_a_side_effect_is_not_retried_once_the_heartbeat_says_lost(fake_market, route, step):
    script, url = fake_market
    _happy(script)
    script.on(*route, UNAVAILABLE, (201, {"offerId": "42"}) if route == CREATE else (204, None))
    beats = iter([True, True, False] if route == CREATE else [True, False])  # lost after the first try
    clock = FakeClock()
    with pytest.raises(LeaseLostError) as exc:
        _retrying(url, clock).handle(ctx(deadline=clock.t + 75, heartbeat=lambda: next(beats)))
    assert step in exc.value.message
    assert [(m, p.split("?")[0]) for m, p, _, _ in script.requests].count(route) == 1
    assert len(clock.sleeps) == 1  # it waited for the retry, then found the lease gone before the call


def test_a_lookup_is_not_retried_once_the_heartbeat_says_lost(fake_market):
    script, url = fake_market
    _happy(script)
    script.on(*PRODUCT, UNAVAILABLE, (200, {}))
    clock = FakeClock()
    with pytest.raises(LeaseLostError) as exc:
        _retrying(url, clock).handle(ctx(deadline=clock.t + 75, heartbeat=lambda: False))
    assert "catalog lookup" in exc.value.message and [m for m, *_ in script.requests] == ["GET"]


def test_a_lost_offer_answer_is_recovered_by_the_retry_with_the_same_key(fake_market):
    script, url = fake_market
    _happy(script)
    script.on(*CREATE, (502, None), (201, {"offerId": "42"}))
    clock = FakeClock()
    assert _retrying(url, clock).handle(ctx(deadline=clock.t + 75))["offer_id"] == "42"
    keys = [h["Idempotency-Key"] for m, _, h, _ in script.requests if m == "POST"]
    assert keys == [f"job-1:{GTIN}"] * 2


def test_marketplace_timeout_and_refused_are_retryable(fake_market):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(RetryableItemError) as exc:
        MarketplaceDraftHandler(dead, sleep=_no_sleep).handle(ctx())
    assert exc.value.code == "marketplace_unavailable" and "catalog lookup" in exc.value.message

    # a server that accepts but never answers
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        slow = MarketplaceDraftHandler(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=(1.0, 0.2),
                                       sleep=_no_sleep)
        with pytest.raises(RetryableItemError) as exc:
            slow.handle(ctx(deadline=time.monotonic() + 3.0))  # room for two tries at 1.2 s
        assert exc.value.code == "marketplace_timeout"
    finally:
        listener.close()


KEY = "k3y-Only-The-Marketplace-May-See"


def test_marketplace_sends_the_api_key_as_bearer_on_every_call(fake_market, monkeypatch):
    """Defect 4 of issue 14: deploy mounted UPCFAN_MARKETPLACE_API_KEY and no call carried it."""
    from shared import config

    script, url = fake_market
    _happy(script)
    monkeypatch.setenv("UPCFAN_MARKETPLACE_API_KEY", KEY)
    config.settings.cache_clear()
    try:
        assert config.settings().marketplace_api_key == KEY and KEY not in repr(config.settings())
        MarketplaceDraftHandler(url).handle(ctx())
    finally:
        config.settings.cache_clear()
    assert [(m, p.split("?")[0]) for m, p, _, _ in script.requests] == [PRODUCT, INVENTORY, OFFERS, CREATE]
    assert {h.get("Authorization") for _, _, h, _ in script.requests} == {f"Bearer {KEY}"}
    assert script.requests[-1][2]["Idempotency-Key"] == f"job-1:{GTIN}"  # merged with the call's own headers


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("key,why", [(KEY, "rejected the API key in UPCFAN_MARKETPLACE_API_KEY"),
                                     ("", "no API key was sent: UPCFAN_MARKETPLACE_API_KEY is not set")])
def test_marketplace_refused_credential_is_permanent_and_named_not_printed(fake_market, status, key, why):
    script, url = fake_market
    _happy(script)
    # A marketplace that quotes the header it refused: the key must not reach the item's error.
    script.on(*INVENTORY, (status, _ebay(1001, f"Invalid access token: Bearer {key}")))
    with pytest.raises(PermanentItemError) as exc:
        MarketplaceDraftHandler(url, api_key=key).handle(ctx())
    assert exc.value.code == "marketplace_unauthorized" and not exc.value.retryable
    assert exc.value.message.startswith(f"inventory item upsert: PUT /sell/inventory/v1/inventory_item/{GTIN} "
                                        f"answered {status} (errorId 1001)")
    assert exc.value.message.endswith(why)
    if key:
        assert KEY not in exc.value.message and KEY not in str(exc.value)
    else:
        assert all("Authorization" not in h for _, _, h, _ in script.requests)


def test_a_delivery_never_logs_the_api_key(fake_market, monkeypatch, caplog, capsys):
    """Capture everything one refused and one successful delivery log: the key is not in it."""
    import logging

    from shared import config
    from shared.events import Event
    from shared.log import JsonFormatter
    from shared.payloads import ItemTask
    from shared.store.memory import MemoryStore
    from shared.worker import job_cache, process_item_delivery

    script, url = fake_market
    _happy(script)
    script.on(*PRODUCT, (401, _ebay(1001, f"Invalid access token: Authorization: Bearer {KEY}")), (200, {}))
    monkeypatch.setenv("UPCFAN_MARKETPLACE_URL", url)
    monkeypatch.setenv("UPCFAN_MARKETPLACE_API_KEY", KEY)
    config.settings.cache_clear()
    caplog.set_level(logging.DEBUG)
    store = MemoryStore()
    outcomes = []
    try:
        for job_id in ("job-refused", "job-ok"):
            store.create_job({"job_id": job_id, "status": "running", "options": {"handler": "marketplace_draft"},
                              "round": 1}, Event("created", "test", dt.datetime.now(dt.timezone.utc)))
            job_cache.JOB_CACHE.clear()
            task = ItemTask(job_id=job_id, gtin=GTIN, upc="012345678905", line=1, round=1)
            outcomes.append(process_item_delivery(task.model_dump(), {"X-CloudTasks-TaskName": job_id}, store=store))
    finally:
        config.settings.cache_clear()
        job_cache.JOB_CACHE.clear()
    refused, ok = (store.get_item(j, GTIN) for j in ("job-refused", "job-ok"))
    # A 401 pauses the job (circuit breaker) and puts the item back without charging it.
    assert refused.status == "queued" and store.get_job("job-refused").status == "paused"
    paused = [d for _, d in store.events["job-refused"] if d["type"] == "paused"]
    assert paused[0]["details"]["code"] == "marketplace_unauthorized"
    assert "UPCFAN_MARKETPLACE_API_KEY" in paused[0]["details"]["message"]
    assert ok.status == "succeeded"
    assert any(h.get("Authorization") == f"Bearer {KEY}" for _, _, h, _ in script.requests)  # it was sent
    captured = capsys.readouterr()
    logged = [JsonFormatter().format(r) for r in caplog.records]  # the lines Cloud Logging would get
    assert any("marketplace_unauthorized" in line for line in logged)  # the refusal was logged...
    for text in (*logged, caplog.text, captured.out, captured.err,  # ...without the key, anywhere
                 json.dumps([o.body for o in outcomes], default=str),
                 json.dumps([refused.doc, ok.doc, store.events["job-refused"]], default=str)):
        assert KEY not in text


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


SANDBOX_TOKEN = "sandbox-token-for-unit-tests"


@pytest.fixture
def sandbox():
    mp = pytest.importorskip("devstack.marketplace")
    from aiohttp import web

    loop = asyncio.new_event_loop()
    app = mp.make_app(seed=1, token=SANDBOX_TOKEN)
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
    handler = MarketplaceDraftHandler(sandbox, api_key=SANDBOX_TOKEN)
    first = handler.handle(ctx())
    assert first["created"] is True and first["sku"] == GTIN
    second = handler.handle(ctx(attempt=2))
    assert second == {"offer_id": first["offer_id"], "sku": GTIN, "created": False}
    stats = requests.get(sandbox + "/_stats", timeout=5).json()
    assert stats["listings"] == 1 and stats["skus_with_duplicates"] == 0 and stats["create_calls"] == 1


def test_sandbox_contract_injected_failure_message(sandbox):
    requests.post(sandbox + "/_faults", json={"fail_gtins": {GTIN: 400}}, timeout=5).raise_for_status()
    with pytest.raises(PermanentItemError) as exc:
        MarketplaceDraftHandler(sandbox, api_key=SANDBOX_TOKEN).handle(ctx())
    assert exc.value.code == "marketplace_rejected" and "Injected failure" in exc.value.message


def test_sandbox_contract_wrong_key_is_unauthorized_and_counted(sandbox):
    with pytest.raises(PermanentItemError) as exc:
        MarketplaceDraftHandler(sandbox, api_key="not-the-token").handle(ctx())
    assert exc.value.code == "marketplace_unauthorized" and "Invalid access token" in exc.value.message
    stats = requests.get(sandbox + "/_stats", timeout=5).json()
    assert stats["unauthorized_calls"] == 1 and stats["listings"] == 0
