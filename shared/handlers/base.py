"""The item handler interface: one external side effect per (job, gtin), run under a worker lease."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable


def _always_alive() -> bool:
    return True


@dataclass(frozen=True)
class ItemContext:
    """What a handler knows about the item it runs for.

    `heartbeat()` is True while this delivery still owns the item's lease; a handler checks it
    right before an external side effect and raises `LeaseLostError` when it turned False.
    """

    job_id: str
    gtin: str
    upc: str
    line: int
    round: int
    attempt: int
    options: dict[str, Any] = field(default_factory=dict)
    heartbeat: Callable[[], bool] = _always_alive


class ItemHandler(abc.ABC):
    """Runs one item. Returns a JSON-able result dict; raises `ItemError` subclasses for failures."""

    name: str = "handler"

    @abc.abstractmethod
    def handle(self, item: ItemContext) -> dict[str, Any]:
        raise NotImplementedError
