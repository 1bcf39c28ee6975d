"""Creates one marketplace draft offer per (job, gtin): catalog lookup, inventory item, offer if absent."""

from __future__ import annotations

import threading
from typing import Any

import requests

from shared.config import settings
from shared.exceptions import ItemError, LeaseLostError, PermanentItemError, RetryableItemError
from shared.handlers.base import ItemContext, ItemHandler
from shared.handlers.errors import classify_exception, classify_response
from shared.naming import idempotency_key_for

MARKETPLACE_ID = "EBAY_US"
OFFER_EXISTS_ERROR_ID = "25002"
# Per call. An item makes at most MAX_CALLS calls (catalog lookup, inventory upsert, offer lookup,
# offer create, and a second offer lookup when the create meets an existing offer);
# `shared/deadlines.py` counts them with these timeouts into the item task's time budget.
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
    nor put in an error message."""

    name = "marketplace_draft"

    def __init__(self, base_url: str | None = None, timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
                 api_key: str | None = None):
        self._base_url = base_url
        self._timeout = timeout
        self._api_key = api_key

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
        product = self._call("catalog lookup", "GET", f"/catalog/v1/product/{item.gtin}", ok=(200,))
        product = product if isinstance(product, dict) else {}
        inventory = {
            "sku": sku,
            "condition": "NEW",
            "availability": {"shipToLocationAvailability": {"quantity": 1}},
            "product": {k: product[k] for k in ("title", "brand", "description", "imageUrls", "aspects") if k in product}
            | {"upc": [item.upc], "gtin": [item.gtin]},
        }
        self._call("inventory item upsert", "PUT", f"/sell/inventory/v1/inventory_item/{sku}", json=inventory, ok=(200, 201, 204))
        existing = self._existing_offer(sku)
        if existing is not None:
            return {"offer_id": existing, "sku": sku, "created": False}
        if not item.heartbeat():
            raise LeaseLostError(f"lease lost before creating the offer for SKU {sku}; another delivery owns the item")
        body = {"sku": sku, "marketplaceId": MARKETPLACE_ID, "format": "FIXED_PRICE", "availableQuantity": 1}
        headers = {"Idempotency-Key": idempotency_key_for(item.job_id, item.gtin)}
        try:
            created = self._call("offer create", "POST", "/sell/inventory/v1/offer", json=body, headers=headers, ok=(200, 201))
        except PermanentItemError as exc:
            # "Offer entity already exists" (409, or 400 with errorId 25002): an offer for the SKU
            # appeared since our lookup, so that offer is our result.
            if exc.code != "marketplace_conflict" and exc.details.get("error_id") != OFFER_EXISTS_ERROR_ID:
                raise
            existing = self._existing_offer(sku)
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

    def _existing_offer(self, sku: str) -> str | None:
        found = self._call("offer lookup", "GET", "/sell/inventory/v1/offer", params={"sku": sku}, ok=(200,))
        found = found if isinstance(found, dict) else {}
        if int(found.get("total") or 0) == 0:
            return None
        offers = found.get("offers") or []
        offer_id = offers[0].get("offerId") if offers and isinstance(offers[0], dict) else None
        return str(offer_id) if offer_id else "unknown"

    def _call(self, step: str, method: str, path: str, *, ok: tuple[int, ...], headers: dict | None = None,
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
