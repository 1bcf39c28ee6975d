"""Creates one marketplace draft offer per (job, gtin): catalog lookup, inventory item, offer if absent."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import requests

from shared.config import settings
from shared.exceptions import ItemError, LeaseLostError, PermanentItemError, RetryableItemError
from shared.handlers.base import ItemContext, ItemHandler
from shared.handlers.errors import classify_exception, classify_response
from shared.log import log_event
from shared.naming import idempotency_key_for
from shared.retry import OUTBOUND_HTTP, is_transient_outbound, retry_after_s

MARKETPLACE_ID = "EBAY_US"
OFFER_EXISTS_ERROR_ID = "25002"
# Per call. An attempt makes at most MAX_CALLS distinct calls (catalog lookup, inventory upsert, offer
# lookup, offer create, and a second offer lookup when the create meets an existing offer), each
# retried in place on a transient answer (`OUTBOUND_HTTP`) while the retry fits in the item's time
# budget (`ItemContext.deadline`; `HANDLER_BUDGET_S` covers MAX_CALLS calls at these timeouts).
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 10.0
MAX_CALLS = 5
API_KEY_VAR = "UPCFAN_MARKETPLACE_API_KEY"

_local = threading.local()


def _session() -> requests.Session:
    """One Session per thread (Sessions are not thread-safe), created on first use."""
    session = getattr(_local, "session", None)
    if session is None:
        session = requests.Session()
        session.headers.update({"Accept": "application/json", "Content-Language": "en-US"})
        _local.session = session
    return session


def _asked_wait_s(fault: BaseException) -> float | None:
    """The wait a fault's answer asked for (its Retry-After), the least the retry waits."""
    details = getattr(fault, "details", None) or {}
    return retry_after_s(details.get("retry_after"))


def _redacted(error: ItemError, key: str) -> ItemError:
    """`error` with any echo of the API key in its message removed (a marketplace may quote a header)."""
    if key and key in error.message:
        error.message = error.message.replace(key, "[redacted]")
        error.args = (error.message,)
    return error


class MarketplaceDraftHandler(ItemHandler):
    """SKU = GTIN-14. The offer is created only when none exists for the SKU, with an idempotency
    key of job_id:gtin so a replayed POST (lost answer, second delivery) cannot list twice.
    Every call carries `Authorization: Bearer <UPCFAN_MARKETPLACE_API_KEY>`; the key is never logged
    nor put in an error message. Every call is idempotent, so each is retried in place on a transient
    answer; the two side effects (inventory upsert, offer create) are made, and retried, only while
    `item.heartbeat()` is True."""

    name = "marketplace_draft"

    def __init__(self, base_url: str | None = None, timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
                 api_key: str | None = None, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self._base_url = base_url
        self._timeout = timeout
        self._api_key = api_key
        self._sleep, self._clock = sleep, clock  # the retry loop's; fakes in unit tests

    @property
    def api_key(self) -> str:
        return self._api_key if self._api_key is not None else settings().marketplace_api_key

    @property
    def base_url(self) -> str:
        url = (self._base_url if self._base_url is not None else settings().marketplace_url).rstrip("/")
        if not url:
            raise PermanentItemError(
                "marketplace draft: no marketplace URL configured (UPCFAN_MARKETPLACE_URL is empty)",
                code="marketplace_not_configured",
            )
        return url

    def handle(self, item: ItemContext) -> dict[str, Any]:
        sku = item.gtin
        product = self._call(item, "catalog lookup", "GET", f"/catalog/v1/product/{item.gtin}", ok=(200,))
        product = product if isinstance(product, dict) else {}
        inventory = {
            "sku": sku,
            "condition": "NEW",
            "availability": {"shipToLocationAvailability": {"quantity": 1}},
            "product": {k: product[k] for k in ("title", "brand", "description", "imageUrls", "aspects") if k in product}
            | {"upc": [item.upc], "gtin": [item.gtin]},
        }
        self._call(item, "inventory item upsert", "PUT", f"/sell/inventory/v1/inventory_item/{sku}", json=inventory,
                   ok=(200, 201, 204), side_effect=True)
        existing = self._existing_offer(item, sku)
        if existing is not None:
            return {"offer_id": existing, "sku": sku, "created": False}
        body = {"sku": sku, "marketplaceId": MARKETPLACE_ID, "format": "FIXED_PRICE", "availableQuantity": 1}
        headers = {"Idempotency-Key": idempotency_key_for(item.job_id, item.gtin)}
        try:
            created = self._call(item, "offer create", "POST", "/sell/inventory/v1/offer", json=body, headers=headers,
                                 ok=(200, 201), side_effect=True)
        except PermanentItemError as exc:
            # "Offer entity already exists" (409, or 400 with errorId 25002): an offer for the SKU
            # appeared since our lookup, so that offer is our result.
            if exc.code != "marketplace_conflict" and exc.details.get("error_id") != OFFER_EXISTS_ERROR_ID:
                raise
            existing = self._existing_offer(item, sku)
            if existing is None:
                raise
            return {"offer_id": existing, "sku": sku, "created": False}
        offer_id = created.get("offerId") if isinstance(created, dict) else None
        if not offer_id:
            raise RetryableItemError(
                f"offer create: POST /sell/inventory/v1/offer answered without an offerId for SKU {sku}",
                code="marketplace_bad_response",
            )
        return {"offer_id": str(offer_id), "sku": sku, "created": True}

    def _existing_offer(self, item: ItemContext, sku: str) -> str | None:
        found = self._call(item, "offer lookup", "GET", "/sell/inventory/v1/offer", params={"sku": sku}, ok=(200,))
        found = found if isinstance(found, dict) else {}
        if int(found.get("total") or 0) == 0:
            return None
        offers = found.get("offers") or []
        offer_id = offers[0].get("offerId") if offers and isinstance(offers[0], dict) else None
        return str(offer_id) if offer_id else "unknown"

    def _call(self, item: ItemContext, step: str, method: str, path: str, *, ok: tuple[int, ...],
              side_effect: bool = False, headers: dict | None = None, **kwargs: Any) -> Any:
        """One call, retried in place on a transient answer (`OUTBOUND_HTTP`: jittered backoff, at least
        the answer's Retry-After, only while the retry and its call fit in the item's time budget).
        A side-effecting call (`side_effect`) is made, first time and every retry, and any call is
        retried, only while the item's heartbeat says this delivery still owns it."""
        call_s = float(sum(self._timeout))
        time_left = lambda: item.time_left(self._clock)  # noqa: E731
        left = time_left()
        if left < call_s:
            raise RetryableItemError(
                f"{step}: {method} {path} not started: {max(left, 0.0):.1f} s left of this attempt's time budget, "
                f"less than one call's {call_s:g} s timeout (earlier calls' retries spent it); the item is retried later",
                code="attempt_budget_spent", details={"step": step},
            )
        fields = {"job_id": item.job_id, "gtin": item.gtin, "item_attempt": item.attempt, "step": step}
        tries = 0

        def once() -> Any:
            nonlocal tries
            tries += 1
            # Before a side effect, every time; before any retry too: a retry comes after a wait, and a
            # delivery that lost the item (or whose job stopped) has no reason to go on asking.
            if (side_effect or tries > 1) and not item.heartbeat():
                raise LeaseLostError(f"lease lost before {step} for SKU {item.gtin} (call {tries}); "
                                     "another delivery may own the item, or its job stopped")
            return self._request(step, method, path, ok=ok, headers=headers, **kwargs)

        def log_retry(attempt: int, fault: BaseException, wait_s: float) -> None:
            details = getattr(fault, "details", {}) or {}
            left = time_left()
            log_event("outbound_retry", severity="WARNING", attempt=attempt, status=details.get("status"),
                      error_code=getattr(fault, "code", None), exception=details.get("exception"),
                      retry_after=details.get("retry_after"), wait_s=round(wait_s, 3),
                      time_left_s=round(left, 3) if left != float("inf") else None, **fields)

        retrying = OUTBOUND_HTTP.retrying_within(time_left, call_s=call_s, min_wait_s=_asked_wait_s,
                                                 before_retry=log_retry, sleep=self._sleep)
        try:
            return retrying(once)
        except ItemError as exc:
            if is_transient_outbound(exc):
                reason = "attempts" if tries >= OUTBOUND_HTTP.attempts else "time_budget"
                log_event("outbound_retries_spent", severity="WARNING", tries=tries, error_code=exc.code,
                          status=exc.details.get("status"), reason=reason, **fields)
                exc.message = f"{exc.message} ({tries} {'try' if tries == 1 else 'tries'} in this attempt, " \
                              f"stopped by its {'retry limit' if reason == 'attempts' else 'time budget'})"
                exc.args = (exc.message,)
            raise

    def _request(self, step: str, method: str, path: str, *, ok: tuple[int, ...], headers: dict | None = None,
                 **kwargs: Any) -> Any:
        key = self.api_key
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            response = _session().request(method, self.base_url + path, timeout=self._timeout,
                                          headers={**(headers or {}), **auth}, **kwargs)
        except requests.RequestException as exc:
            raise _redacted(classify_exception(step, method, path, exc), key) from exc
        if response.status_code not in ok:
            refused = (f"the marketplace rejected the API key in {API_KEY_VAR}" if key
                       else f"no API key was sent: {API_KEY_VAR} is not set")
            raise _redacted(classify_response(step, method, path, response, credential=refused), key)
        if response.status_code == 204 or not response.content:
            return {}
        try:
            return response.json()
        except ValueError:
            raise RetryableItemError(
                f"{step}: {method} {path} answered {response.status_code} with a body that is not JSON",
                code="marketplace_bad_response",
            ) from None
