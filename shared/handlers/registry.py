"""Item handlers by name: a job's options name the handler its items run; adding one is its module + one line here."""

from __future__ import annotations

from shared.exceptions import BadRequestError
from shared.handlers.base import ItemHandler
from shared.handlers.dry_run import DryRunHandler
from shared.handlers.marketplace_draft import MarketplaceDraftHandler

_HANDLERS: dict[str, ItemHandler] = {}


def register(handler_class: type[ItemHandler]) -> type[ItemHandler]:
    """Make `handler_class` runnable under its `name` (one shared instance: handlers keep no per-item state)."""
    _HANDLERS[handler_class.name] = handler_class()
    return handler_class


register(DryRunHandler)
register(MarketplaceDraftHandler)


def known_handler_names() -> list[str]:
    return sorted(_HANDLERS)


def check_handler_name(name: str, where: str = "handler") -> str:
    """`name` when a handler is registered under it, else a 400 `unknown_handler` listing the known names."""
    if name not in _HANDLERS:
        raise BadRequestError(f"{where}: unknown handler {str(name)[:100]!r}; known handlers: "
                              f"{', '.join(known_handler_names())}", code="unknown_handler",
                              details={"known_handlers": known_handler_names()})
    return name


def handler_named(name: str) -> ItemHandler:
    return _HANDLERS[check_handler_name(name)]
