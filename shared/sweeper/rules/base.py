"""What a sweeper rule is: a declarative query, a pure classify step and the index that serves the query."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Callable

from shared.config import Settings
from shared.sweeper.findings import Finding

# Under this key a per-job rule's classify step finds the job's documents its query matched.
MATCHED = "_matched"


@dataclass(frozen=True)
class Where:
    """One filter: `field op value(now, settings)` — the value is computed at each sweep."""

    field: str
    op: str  # a Firestore operator: ==, <, <=, >, >=, in
    value: Callable[[dt.datetime, Settings], Any]


@dataclass(frozen=True)
class Query:
    """A query the store runs: a collection (or, with `collection_group`, every collection of that
    name), its filters and an optional limit. With `per_job` the results are documents under
    `jobs/{id}/…`; the engine groups them by job and classifies each job once (see `MATCHED`)."""

    collection: str
    filters: tuple[Where, ...]
    collection_group: bool = False
    limit: int | None = None
    per_job: bool = False


@dataclass(frozen=True)
class IndexSpec:
    """The composite index (ascending fields) that serves a rule's query; firestore.indexes.json holds it."""

    collection_group: str
    query_scope: str  # COLLECTION | COLLECTION_GROUP
    fields: tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    """One kind of stall (or a few that share one query).

    `classify(doc, now, settings)` is pure: `doc` is the job document (with `job_id`, and for a
    `per_job` query the matched documents under `MATCHED`); it returns a `Finding` or None.
    Registry order (`shared/sweeper/rules/__init__.py`) breaks ties between equally severe findings
    of one job: the first rule's kind is kept.
    """

    name: str  # the query's name in the sweep report (`queries_ms`)
    kinds: tuple[str, ...]
    query: Query
    classify: Callable[[dict, dt.datetime, Settings], Finding | None]
    index: IndexSpec | None
    # Whether an alert for this rule reports the job's never-claimed items (a count when the
    # job's snapshot cannot tell).
    reports_never_claimed: bool = True
    # How a job flagged by this rule moved again besides progress or a final status, else None.
    moved_on: Callable[[dict], str | None] = lambda job: None
