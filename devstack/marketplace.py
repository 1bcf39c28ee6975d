"""Sandbox marketplace shaped like eBay's Inventory API, with counters that expose duplicate listings.

Routes the worker's handler calls (keep them exactly so):
  GET  /catalog/v1/product/{gtin}                -> 200 {"gtin", "title", "brand"}
  PUT  /sell/inventory/v1/inventory_item/{sku}   -> 204 (upsert)
  GET  /sell/inventory/v1/offer?sku={sku}        -> 200 {"offers": [...], "total": n}
  POST /sell/inventory/v1/offer  (Idempotency-Key) -> 201 {"offerId"}; a seen key replays the first answer

Like eBay, the marketplace routes require `Authorization: Bearer <token>` (the token given at start:
env UPCFAN_MARKETPLACE_TOKEN, or --token; --no-auth opens them); without it they answer 401 with an
eBay-style OAuth error and count `unauthorized_calls`. The control routes (`/_...`) stay open:
GET /_stats, GET|POST|PATCH /_faults (the knobs: `Faults`), GET|POST /_config, GET /_listings,
POST /_reset, GET /_health.
It is deliberately naive: a second offer for the same SKU is accepted (unless `enforce_unique_sku`)
so tests can count duplicates with `skus_with_duplicates`.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import hashlib
import hmac
import os
import random
import time
from dataclasses import dataclass, field

from aiohttp import web

from devstack.procs import run_local_server

DOMAIN = "API_INVENTORY"
TOKEN_VAR = "UPCFAN_MARKETPLACE_TOKEN"
_BRANDS = ("Acme", "Globex", "Initech", "Umbrella", "Soylent", "Hooli", "Stark", "Wayne")
_NOUNS = ("Widget", "Gadget", "Sprocket", "Gizmo", "Doohickey", "Thingamajig", "Contraption", "Device")
_ADJECTIVES = ("Deluxe", "Compact", "Premium", "Classic", "Portable", "Heavy-Duty", "Eco", "Smart")


def normalize_key(value: str) -> str:
    """GTIN/SKU as a GTIN-14 when it is all digits (fault keys and SKUs are GTIN-14)."""
    value = (value or "").strip()
    return value.zfill(14) if value.isdigit() and len(value) <= 14 else value


def fake_product(gtin: str) -> dict:
    """Deterministic catalog data for a GTIN."""
    digest = hashlib.sha256(gtin.encode()).digest()
    brand = _BRANDS[digest[0] % len(_BRANDS)]
    title = f"{brand} {_ADJECTIVES[digest[1] % len(_ADJECTIVES)]} {_NOUNS[digest[2] % len(_NOUNS)]} {digest[3]:03d}"
    return {"gtin": gtin, "title": title, "brand": brand}


def error_body(error_id: int, message: str, *, category: str = "REQUEST", **extra) -> dict:
    err = {"errorId": error_id, "domain": DOMAIN, "category": category, "message": message}
    err.update(extra)
    return {"errors": [err]}


# eBay-style error ids for injected statuses.
_ERROR_IDS = {400: 25709, 404: 25710, 409: 25002, 429: 2001, 500: 25001, 502: 25001, 503: 25001, 504: 25001}


RETRY_AFTER_FORMATS = ("seconds", "http-date")


@dataclass
class Faults:
    """The injected faults, set as a whole by `POST /_faults` (merged key by key by `PATCH /_faults`).

    - `error_rate` of EVERY marketplace call answers `status` before any effect (e.g. 0.3 and 503:
      30% 503 for the whole run); `latency_ms` delays every call; `error_after_effect_rate` of offer
      creates lose their answer after the offer was made.
    - `fail_gtins` {gtin: status} / `latency_gtins` {gtin: ms}: per product.
    - `outage_s`: a total outage, every marketplace call answers `outage_status` for that many
      seconds from when it was set, then healthy again (`GET /_faults` shows the seconds left).
    - `reject_auth`: every marketplace call answers 401 (eBay's invalid-token answer) as if the
      token were revoked, until switched off.
    - `retry_after_s` / `retry_after_format`: the Retry-After every injected 429 carries, in seconds or
      as an HTTP-date (None: no header).
    """

    error_rate: float = 0.0
    latency_ms: float = 0.0
    status: int = 503
    error_after_effect_rate: float = 0.0
    fail_gtins: dict = field(default_factory=dict)
    latency_gtins: dict = field(default_factory=dict)
    outage_until: float = 0.0  # time.monotonic(); from `outage_s` when set
    outage_status: int = 503
    reject_auth: bool = False
    retry_after_s: float | None = 1.0
    retry_after_format: str = "seconds"

    def outage_left_s(self) -> float:
        return max(0.0, self.outage_until - time.monotonic())

    def as_dict(self) -> dict:
        return {
            "error_rate": self.error_rate,
            "latency_ms": self.latency_ms,
            "status": self.status,
            "error_after_effect_rate": self.error_after_effect_rate,
            "fail_gtins": dict(self.fail_gtins),
            "latency_gtins": dict(self.latency_gtins),
            "outage_s": round(self.outage_left_s(), 3),
            "outage_status": self.outage_status,
            "reject_auth": self.reject_auth,
            "retry_after_s": self.retry_after_s,
            "retry_after_format": self.retry_after_format,
        }

    @classmethod
    def from_dict(cls, spec: dict, base: "Faults | None" = None) -> "Faults":
        """Faults from a `/_faults` body: `spec` alone, or merged into `base`. A bad value or an
        unknown knob raises ValueError naming it."""
        if not isinstance(spec, dict):
            raise ValueError(f"the faults body must be a JSON object, got {type(spec).__name__}")
        unknown = sorted(set(spec) - set(cls().as_dict()) - {"enforce_unique_sku"})
        if unknown:
            raise ValueError(f"unknown fault knob(s) {', '.join(unknown)}; known: {', '.join(cls().as_dict())}")
        merged = {**(base.as_dict() if base else {}), **spec}
        status = _http_status(merged.get("status", 503), "status")
        outage_s = _number(merged.get("outage_s", 0.0), "outage_s")
        retry_after = merged.get("retry_after_s", 1.0)
        retry_after_format = str(merged.get("retry_after_format", "seconds"))
        if retry_after_format not in RETRY_AFTER_FORMATS:
            raise ValueError(f"retry_after_format must be one of {', '.join(RETRY_AFTER_FORMATS)}, got {retry_after_format!r}")
        reject_auth = merged.get("reject_auth", False)
        if not isinstance(reject_auth, bool):
            raise ValueError(f"reject_auth must be true or false, got {reject_auth!r}")
        return cls(
            error_rate=_share(merged.get("error_rate", 0.0), "error_rate"),
            latency_ms=_number(merged.get("latency_ms", 0.0), "latency_ms"),
            status=status,
            error_after_effect_rate=_share(merged.get("error_after_effect_rate", 0.0), "error_after_effect_rate"),
            fail_gtins={normalize_key(k): _http_status(v, f"fail_gtins[{k}]") for k, v in (merged.get("fail_gtins") or {}).items()},
            latency_gtins={normalize_key(k): _number(v, f"latency_gtins[{k}]") for k, v in (merged.get("latency_gtins") or {}).items()},
            outage_until=time.monotonic() + outage_s if outage_s > 0 else 0.0,
            outage_status=_http_status(merged.get("outage_status", 503), "outage_status"),
            reject_auth=reject_auth,
            retry_after_s=None if retry_after is None else _number(retry_after, "retry_after_s"),
            retry_after_format=retry_after_format,
        )


def _number(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return number


def _share(value, name: str) -> float:
    share = _number(value, name)
    if share > 1:
        raise ValueError(f"{name} is a share of calls, between 0 and 1, got {value!r}")
    return share


def _http_status(value, name: str) -> int:
    try:
        status = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an HTTP status, got {value!r}") from None
    if not 400 <= status <= 599:
        raise ValueError(f"{name} must be an HTTP error status (400-599), got {value!r}")
    return status


class Marketplace:
    """All state of the sandbox; one instance per app, touched only from the event loop."""

    def __init__(self, seed: int | None = None, enforce_unique_sku: bool = False, token: str | None = None) -> None:
        self._seed = seed
        self._default_enforce = enforce_unique_sku
        self._token = token  # None: marketplace routes open (--no-auth)
        self.reset()

    def authorized(self, header: str | None) -> bool:
        """True when auth is off or `header` is `Bearer <token>` (compared in constant time)."""
        if self._token is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token.encode())

    def reset(self) -> None:
        self.rng = random.Random(self._seed)
        self.faults = Faults()
        self.enforce_unique_sku = self._default_enforce
        self.inventory: dict[str, dict] = {}
        self.offers: dict[str, dict] = {}
        self.offers_by_sku: dict[str, list[str]] = {}
        self.idempotency: dict[str, tuple[int, dict]] = {}
        self.next_offer = 1
        self.counters = {
            "create_calls": 0,
            "inventory_puts": 0,
            "lookups": 0,
            "offer_queries": 0,
            "idempotent_replays": 0,
            "faults_injected": 0,
            "lost_responses": 0,
            "rejected_duplicates": 0,
            "offers_without_inventory_item": 0,
            "requests": 0,
            "unauthorized_calls": 0,
            "outage_calls": 0,
            "rate_limited": 0,
        }

    def stats(self) -> dict:
        dup = sum(1 for ids in self.offers_by_sku.values() if len(ids) > 1)
        return {
            "listings": len(self.offers),
            "skus_with_duplicates": dup,
            "skus": len(self.offers_by_sku),
            "inventory_items": len(self.inventory),
            **self.counters,
        }

    def create_offer(self, body: dict) -> dict:
        offer_id = f"{self.next_offer:012d}"
        self.next_offer += 1
        sku = normalize_key(str(body.get("sku", "")))
        offer = {
            "offerId": offer_id,
            "sku": sku,
            "marketplaceId": body.get("marketplaceId", "EBAY_US"),
            "format": body.get("format", "FIXED_PRICE"),
            "availableQuantity": body.get("availableQuantity", 0),
            "status": "UNPUBLISHED",
            "created_at": time.time(),
            "request": body,
        }
        if sku not in self.inventory:
            self.counters["offers_without_inventory_item"] += 1
        self.offers[offer_id] = offer
        self.offers_by_sku.setdefault(sku, []).append(offer_id)
        return offer


MARKET_KEY = web.AppKey("market", Marketplace)


def _public_offer(offer: dict) -> dict:
    return {
        "offerId": offer["offerId"],
        "sku": offer["sku"],
        "marketplaceId": offer["marketplaceId"],
        "format": offer["format"],
        "availableQuantity": offer["availableQuantity"],
        "status": offer["status"],
    }


def _fault_response(m: Marketplace, status: int, message: str, **extra) -> web.Response:
    m.counters["faults_injected"] += 1
    category = "APPLICATION" if status >= 500 else "REQUEST"
    body = error_body(_ERROR_IDS.get(status, 25001), message, category=category, **extra)
    headers = None
    if status == 429:
        m.counters["rate_limited"] += 1
        wait = m.faults.retry_after_s
        if wait is not None:
            headers = {"Retry-After": (email.utils.formatdate(time.time() + wait, usegmt=True)
                                       if m.faults.retry_after_format == "http-date" else f"{wait:g}")}
    return web.json_response(body, status=status, headers=headers)


async def _apply_faults(m: Marketplace, key: str | None) -> web.Response | None:
    """Latency, per-GTIN failures and random failures that happen before any effect."""
    f = m.faults
    delay_ms = f.latency_ms + (f.latency_gtins.get(key, 0.0) if key else 0.0)
    if delay_ms > 0:
        await asyncio.sleep(delay_ms / 1000.0)
    if key and key in f.fail_gtins:
        status = f.fail_gtins[key]
        return _fault_response(
            m,
            status,
            f"Injected failure for GTIN/SKU {key}: the marketplace rejects this product.",
            parameters=[{"name": "sku", "value": key}],
        )
    if f.error_rate > 0 and m.rng.random() < f.error_rate:
        return _fault_response(m, f.status, "A system error has occurred. Injected before any effect.")
    return None


def unauthorized_body() -> dict:
    """eBay's answer to a missing or invalid OAuth token (HTTP 401)."""
    return {"errors": [{"errorId": 1001, "domain": "OAuth", "category": "REQUEST", "message": "Invalid access token",
                        "longMessage": "Invalid access token. Check the value of the Authorization HTTP request header."}]}


@web.middleware
async def _count_and_authorize(request: web.Request, handler):
    """Marketplace routes: counted in `requests`; during an injected outage answered `outage_status`
    (`outage_calls`); refused (401, `unauthorized_calls`) without the bearer token or while
    `reject_auth` is on. Control routes (`/_...`) are neither counted nor checked."""
    if not request.path.startswith("/_"):
        m = request.app[MARKET_KEY]
        m.counters["requests"] += 1
        left = m.faults.outage_left_s()
        if left > 0:
            m.counters["outage_calls"] += 1
            return _fault_response(m, m.faults.outage_status,
                                   f"The service is unavailable (injected outage, {left:.1f} s left).")
        if m.faults.reject_auth or not m.authorized(request.headers.get("Authorization")):
            m.counters["unauthorized_calls"] += 1
            return web.json_response(unauthorized_body(), status=401, headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


async def get_product(request: web.Request) -> web.Response:
    m = request.app[MARKET_KEY]
    gtin = request.match_info["gtin"]
    m.counters["lookups"] += 1
    fault = await _apply_faults(m, normalize_key(gtin))
    if fault:
        return fault
    if not gtin.isdigit() or len(gtin) > 14:
        return web.json_response(error_body(25709, f"Invalid GTIN {gtin!r}."), status=400)
    return web.json_response(fake_product(normalize_key(gtin)))


async def put_inventory_item(request: web.Request) -> web.Response:
    m = request.app[MARKET_KEY]
    sku = normalize_key(request.match_info["sku"])
    m.counters["inventory_puts"] += 1
    try:
        body = await request.json()
    except Exception:
        return web.json_response(error_body(25709, "Invalid JSON body."), status=400)
    fault = await _apply_faults(m, sku)
    if fault:
        return fault
    m.inventory[sku] = body if isinstance(body, dict) else {"value": body}
    return web.Response(status=204)


async def get_offers(request: web.Request) -> web.Response:
    m = request.app[MARKET_KEY]
    raw_sku = request.query.get("sku", "")
    m.counters["offer_queries"] += 1
    if not raw_sku:
        return web.json_response(error_body(25709, "Missing query parameter sku."), status=400)
    sku = normalize_key(raw_sku)
    fault = await _apply_faults(m, sku)
    if fault:
        return fault
    offers = [_public_offer(m.offers[i]) for i in m.offers_by_sku.get(sku, [])]
    return web.json_response({"offers": offers, "total": len(offers)})


async def create_offer(request: web.Request) -> web.Response:
    m = request.app[MARKET_KEY]
    m.counters["create_calls"] += 1
    try:
        body = await request.json()
    except Exception:
        return web.json_response(error_body(25709, "Invalid JSON body."), status=400)
    if not isinstance(body, dict) or not body.get("sku"):
        return web.json_response(error_body(25709, "Invalid value for sku."), status=400)
    sku = normalize_key(str(body["sku"]))
    fault = await _apply_faults(m, sku)
    if fault:
        return fault
    # From here to the answer nothing awaits: check-and-create is atomic on the event loop.
    key = request.headers.get("Idempotency-Key")
    if key and key in m.idempotency:
        m.counters["idempotent_replays"] += 1
        status, stored = m.idempotency[key]
        return web.json_response(stored, status=status)
    if m.enforce_unique_sku and m.offers_by_sku.get(sku):
        m.counters["rejected_duplicates"] += 1
        return web.json_response(
            error_body(
                25002,
                "Offer entity already exists",
                parameters=[{"name": "offerId", "value": m.offers_by_sku[sku][0]}],
            ),
            status=400,
        )
    offer = m.create_offer(body)
    answer = {"offerId": offer["offerId"]}
    if key:
        m.idempotency[key] = (201, answer)
    f = m.faults
    if f.error_after_effect_rate > 0 and m.rng.random() < f.error_after_effect_rate:
        # The offer exists but the caller never learns it: the realistic lost-response case.
        m.counters["lost_responses"] += 1
        return _fault_response(m, f.status, "A system error has occurred. Injected after the offer was created.")
    return web.json_response(answer, status=201)


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[MARKET_KEY].stats())


async def get_faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[MARKET_KEY].faults.as_dict())


async def set_faults(request: web.Request) -> web.Response:
    """POST: these faults replace all others; PATCH: the given knobs change, the rest stay (e.g.
    `{"reject_auth": false}` switches the 401s off while a 30% error rate goes on)."""
    m = request.app[MARKET_KEY]
    try:
        spec = await request.json() if request.can_read_body else {}
    except ValueError:
        return web.json_response({"error": "the faults body is not JSON"}, status=400)
    try:
        m.faults = Faults.from_dict(spec or {}, base=m.faults if request.method == "PATCH" else None)
    except (TypeError, ValueError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    if "enforce_unique_sku" in (spec or {}):
        m.enforce_unique_sku = bool(spec["enforce_unique_sku"])
    return web.json_response(m.faults.as_dict())


async def get_config(request: web.Request) -> web.Response:
    return web.json_response({"enforce_unique_sku": request.app[MARKET_KEY].enforce_unique_sku})


async def set_config(request: web.Request) -> web.Response:
    m = request.app[MARKET_KEY]
    spec = await request.json() if request.can_read_body else {}
    if "enforce_unique_sku" in spec:
        m.enforce_unique_sku = bool(spec["enforce_unique_sku"])
    return web.json_response({"enforce_unique_sku": m.enforce_unique_sku})


async def listings(request: web.Request) -> web.Response:
    m = request.app[MARKET_KEY]
    sku = request.query.get("sku")
    ids = m.offers_by_sku.get(normalize_key(sku), []) if sku else list(m.offers)
    out = [{**_public_offer(m.offers[i]), "created_at": m.offers[i]["created_at"]} for i in ids]
    return web.json_response({"listings": out, "total": len(out)})


async def reset(request: web.Request) -> web.Response:
    request.app[MARKET_KEY].reset()
    return web.json_response({"ok": True})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "component": "marketplace"})


def make_app(seed: int | None = None, enforce_unique_sku: bool = False, *, token: str | None) -> web.Application:
    """The sandbox; `token` is the bearer token its marketplace routes require (None: open, say so)."""
    app = web.Application(middlewares=[_count_and_authorize])
    app[MARKET_KEY] = Marketplace(seed=seed, enforce_unique_sku=enforce_unique_sku, token=token)
    r = app.router
    r.add_get("/catalog/v1/product/{gtin}", get_product)
    r.add_put("/sell/inventory/v1/inventory_item/{sku}", put_inventory_item)
    r.add_get("/sell/inventory/v1/offer", get_offers)
    r.add_post("/sell/inventory/v1/offer", create_offer)
    r.add_get("/_stats", stats)
    r.add_get("/_faults", get_faults)
    r.add_post("/_faults", set_faults)
    r.add_patch("/_faults", set_faults)
    r.add_get("/_config", get_config)
    r.add_post("/_config", set_config)
    r.add_get("/_listings", listings)
    r.add_post("/_reset", reset)
    r.add_get("/_health", health)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sandbox marketplace (eBay Inventory API shape)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seed", type=int, default=None, help="seed for injected random faults")
    parser.add_argument("--enforce-unique-sku", action="store_true")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--token", help=f"bearer token the marketplace routes require (prefer env {TOKEN_VAR}: "
                                      "an argument is visible to every local user)")
    auth.add_argument("--no-auth", action="store_true", help="marketplace routes need no token")
    args = parser.parse_args(argv)
    token = None if args.no_auth else (args.token or os.environ.get(TOKEN_VAR, "").strip())
    if token == "":
        parser.error(f"no token: set {TOKEN_VAR} (or --token), or pass --no-auth to leave the routes open")
    app = make_app(seed=args.seed, enforce_unique_sku=args.enforce_unique_sku, token=token)
    run_local_server(app, "marketplace", args.host, args.port, backlog=1024)


if __name__ == "__main__":
    main()
