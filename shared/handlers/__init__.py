"""Item handlers (one side effect per item), registered by name, and the handler a job's options name."""

from __future__ import annotations

from typing import Any

from shared.handlers.base import ItemContext, ItemHandler
from shared.handlers.choice import HandlerChoice, choose_handler
from shared.handlers.dry_run import DryRunHandler
from shared.handlers.marketplace_draft import MarketplaceDraftHandler
from shared.handlers.registry import handler_named, known_handler_names, register


def handler_for(options: dict[str, Any] | None) -> ItemHandler:
    """The handler a job's options name (`{"handler": NAME}`); jobs written before names carry only the
    booleans `test_mode`/`create_drafts`, and resolve exactly as they did then."""
    options = options or {}
    return handler_named(choose_handler(HandlerChoice(handler=options.get("handler"),
                                                      test_mode=options.get("test_mode"),
                                                      create_drafts=options.get("create_drafts"),
                                                      source="job options")))


__all__ = ["DryRunHandler", "HandlerChoice", "ItemContext", "ItemHandler", "MarketplaceDraftHandler", "handler_for",
           "handler_named", "known_handler_names", "register"]
