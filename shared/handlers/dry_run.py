"""Test-mode handler: validates the GTIN and reports what would be listed, with no external call."""

from __future__ import annotations

from typing import Any

from shared.exceptions import PermanentItemError
from shared.gtin import InvalidUpcError, normalize_gtin
from shared.handlers.base import ItemContext, ItemHandler


class DryRunHandler(ItemHandler):
    name = "dry_run"

    def handle(self, item: ItemContext) -> dict[str, Any]:
        try:
            gtin = normalize_gtin(item.upc)
        except InvalidUpcError as exc:
            raise PermanentItemError(f"dry run: UPC on line {item.line} is invalid: {exc.message}", code="invalid_gtin") from None
        if gtin.gtin14 != item.gtin:
            raise PermanentItemError(
                f"dry run: UPC '{item.upc}' on line {item.line} normalises to {gtin.gtin14}, not the task's {item.gtin}",
                code="gtin_mismatch",
            )
        return {"dry_run": True, "sku": gtin.gtin14, "kind": gtin.kind, "offer_id": None, "created": False}
