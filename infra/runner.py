"""plan / apply over a list of resources."""

from __future__ import annotations

from typing import Callable, Iterable

from infra.clients import Clients
from infra.resources.base import BLOCKED, Change, Resource


def plan(resources: Iterable[Resource], clients: Clients) -> list[Change]:
    return [r.plan(clients.get(r.client_name)) for r in resources]


def apply(resources: Iterable[Resource], clients: Clients, echo: Callable[[str], None] = lambda s: None) -> list[Change]:
    """Plan each resource just before applying it, so later resources see earlier ones."""
    done = []
    for r in resources:
        client = clients.get(r.client_name)
        change = r.plan(client)
        echo(change.render())
        if change.changed:
            r.apply(client, change)
        done.append(change)
    return done


def summary(changes: list[Change], head: str = "Plan") -> str:
    counts: dict[str, int] = {}
    for c in changes:
        counts[c.action] = counts.get(c.action, 0) + 1
    parts = [f"{counts.get(a, 0)} to {a}" for a in ("create", "update")] + [f"{counts.get('no-op', 0)} unchanged"]
    if counts.get(BLOCKED):
        parts.append(f"{counts[BLOCKED]} blocked")
    return f"{head}: " + ", ".join(parts)
