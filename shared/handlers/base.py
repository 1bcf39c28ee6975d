"""The item handler interface: one external side effect per (job, gtin), run under a worker lease."""

from __future__ import annotations

import abc
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

# The time one handler run may take in an attempt (the worker sets `ItemContext.deadline` from it).
# A handler bounds its in-attempt retries by it; `shared/deadlines.py` counts it into the item task's
# budget, under the dispatch deadline. It covers one full pass of the marketplace draft handler with
# every call at its timeout (5 x 13 s), so the budget only ever cuts retries, never a slow first pass.
HANDLER_BUDGET_S = 75.0


def _always_alive() -> bool:
    return True


@dataclass(frozen=True)
class ItemContext:
    """What a handler knows about the item it runs for.

    `heartbeat()` is True while this delivery still owns the item's lease; a handler checks it
    right before an external side effect and raises `LeaseLostError` when it turned False.
    `deadline` is when the handler must be done, on `time.monotonic()`'s scale (none by default):
    a handler makes no retry that would end past it.
    """

    job_id: str
    gtin: str
    upc: str
    line: int
    round: int
    attempt: int
    options: dict[str, Any] = field(default_factory=dict)
    heartbeat: Callable[[], bool] = _always_alive
    deadline: float = math.inf

    def time_left(self, clock: Callable[[], float] = time.monotonic) -> float:
        """Seconds until `deadline` (inf without one)."""
        return self.deadline - clock()


class ItemHandler(abc.ABC):
    """Runs one item. Returns a JSON-able result dict; raises `ItemError` subclasses for failures."""

    name: str = "handler"

    @abc.abstractmethod
    def handle(self, item: ItemContext) -> dict[str, Any]:
        raise NotImplementedError
