"""The one interface every resource kind implements, and the field-by-field diff.

A resource compares *normalised* plain dicts: `desired()` says what we want,
`read(client)` turns the live object into the same shape (or None when absent),
`diff()` lists the fields that differ, `apply()` makes one create or update call.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

CREATE, UPDATE, NOOP, BLOCKED = "create", "update", "no-op", "blocked"


@dataclass
class Change:
    resource: "Resource"
    action: str
    # field path -> (actual, desired); for create every desired field with actual None.
    fields: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    actual: Any = None
    note: str = ""

    @property
    def changed(self) -> bool:
        return self.action in (CREATE, UPDATE)

    def render(self) -> str:
        head = f"{self.action:7} {self.resource.kind}  {self.resource.name}"
        if self.note:
            head += f"  ({self.note})"
        lines = [head]
        if self.action == UPDATE:
            for path, (old, new) in sorted(self.fields.items()):
                lines.append(f"          ~ {path}: {old!r} -> {new!r}")
        elif self.action == CREATE:
            for path, (_, new) in sorted(self.fields.items()):
                lines.append(f"          + {path}: {new!r}")
        return "\n".join(lines)


class NotReady(Exception):
    """The resource depends on something that does not exist yet (e.g. a function not deployed)."""


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and scalars are leaves."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def diff_fields(actual: dict | None, desired: dict) -> dict[str, tuple[Any, Any]]:
    want = flatten(desired)
    have = flatten(actual or {})
    return {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}


class Resource(abc.ABC):
    kind: str = "resource"
    client_name: str = ""  # key in infra.clients.Clients

    @property
    @abc.abstractmethod
    def name(self) -> str: ...

    @abc.abstractmethod
    def desired(self) -> dict:
        """Normalised desired fields (only the ones this tool manages)."""

    @abc.abstractmethod
    def read(self, client) -> dict | None:
        """Normalised actual fields, None when the resource does not exist. May raise NotReady."""

    def diff(self, actual: dict | None) -> Change:
        want = self.desired()
        if actual is None:
            return Change(self, CREATE, {k: (None, v) for k, v in flatten(want).items()}, actual)
        fields = diff_fields(actual, want)
        return Change(self, UPDATE if fields else NOOP, fields, actual)

    @abc.abstractmethod
    def apply(self, client, change: Change) -> None:
        """Make the create/update call(s) for a change from diff()."""

    def plan(self, client) -> Change:
        try:
            actual = self.read(client)
        except NotReady as exc:
            return Change(self, BLOCKED, note=str(exc))
        return self.diff(actual)
