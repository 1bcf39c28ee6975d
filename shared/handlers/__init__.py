"""Item handlers (one side effect per item) and the choice of handler from a job's options."""

from __future__ import annotations

from typing import Any

from shared.handlers.base import ItemContext, ItemHandler
from shared.handlers.dry_run import DryRunHandler
from shared.handlers.marketplace_draft import MarketplaceDraftHandler

_DRY_RUN = DryRunHandler()
_MARKETPLACE = MarketplaceDraftHandler()


def handler_for(options: dict[str, Any] | None) -> ItemHandler:
    """test_mode wins (never touches the marketplace); create_drafts → marketplace; neither → dry run."""
    options = options or {}
    if options.get("test_mode"):
        return _DRY_RUN
    if options.get("create_drafts"):
        return _MARKETPLACE
    return _DRY_RUN


__all__ = ["DryRunHandler", "ItemContext", "ItemHandler", "MarketplaceDraftHandler", "handler_for"]
