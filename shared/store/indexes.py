"""Every Firestore query the code runs, the index each one needs, and the stored fields of the
collections written at fan-out rate — the data `firestore.indexes.json` is checked against.

Why it exists: Firestore limits writes to a collection whose documents carry an *indexed* field
with sequential values (timestamps, line numbers) to about 500 per second, because every write
lands at the same end of that field's index. Items are written 2–3 times each at up to thousands
per second, so an item field stays indexed only when a query below needs it, and only in the
modes (ascending, descending, array-contains) that query uses. `tests/unit/test_index_catalog.py`
checks, statically (the Firestore emulator ignores index definitions, so no emulator run can):

- every query the stores actually issue (recorded from `FirestoreStore` and the sweeper's
  declarative queries) is one of `QUERIES`;
- every composite index in the file serves a query here, and every query's composite is there;
- no field override exempts an index a query here needs;
- every field of a `HIGH_RATE` collection is in `FIELDS` (new item fields are found in the code
  that writes them), and its override keeps exactly the modes the queries need — none for a field
  no query reads.

A new query: add its shape here, then the index (composite in `indexes`, or the mode in the
field's override). A new item field: add it to `FIELDS`; it is exempted unless a query needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.model import ALERT_STATE, CHUNKS, EVENTS, ITEMS, JOBS, LINES, STALL_EVENTS

ASC, DESC, CONTAINS = "ASCENDING", "DESCENDING", "CONTAINS"
MODES = (ASC, DESC, CONTAINS)
COLLECTION, COLLECTION_GROUP = "COLLECTION", "COLLECTION_GROUP"

# Collections written at item rate (fan-out and every delivery). Every field of these carries an
# explicit override in firestore.indexes.json. The others (jobs, chunks, events, stall_events,
# alert_state) are written a few times per job per minute, far below 500/s, and keep Firestore's
# automatic single-field indexes.
HIGH_RATE = (ITEMS, LINES)


@dataclass(frozen=True)
class QueryShape:
    """One query as Firestore plans it: equality (`==`, `in`) filters, and at most one field that is
    range-filtered or ordered on (with its direction). Ordering by the document name only adds no
    index: every index ends with it."""

    name: str  # where the query runs
    collection_group: str
    equals: tuple[str, ...] = ()
    range: tuple[str, str] | None = None  # (field, ASC | DESC)
    scope: str = COLLECTION

    def composite(self) -> tuple[str, str, tuple[tuple[str, str], ...]] | None:
        """(collection group, scope, fields) of the composite index this query needs, if any."""
        if self.range is not None and self.equals:
            return (self.collection_group, self.scope,
                    tuple((f, ASC) for f in self.equals) + (self.range,))
        return None

    def single_fields(self) -> set[tuple[str, str, str]]:
        """(field, mode, scope) single-field indexes this query needs: equality-only queries merge
        the ascending indexes of their fields; a range or order on one field alone uses that field's
        index in its direction."""
        if self.range is None:
            return {(f, ASC, self.scope) for f in self.equals}
        if not self.equals:
            return {(self.range[0], self.range[1], self.scope)}
        return set()


QUERIES: tuple[QueryShape, ...] = (
    # items (jobs/{id}/items): per job, never across jobs
    QueryShape("progress: count_items_by_status", ITEMS, equals=("status",)),
    QueryShape("progress/sweeper: count_never_claimed", ITEMS, equals=("status", "attempt")),
    QueryShape("api/operations: page_items (status and/or round), by document id", ITEMS, equals=("status", "round")),
    QueryShape("api/operations: page_items by status", ITEMS, equals=("status",)),
    QueryShape("retry round: page_items by round", ITEMS, equals=("round",)),
    QueryShape("results: page_items_by_line", ITEMS, range=("line", ASC)),
    QueryShape("sweeper lease_overrun: processing items past their lease, every lease shard", ITEMS,
               equals=("status", "lease_shard"), range=("lease_expires_at", ASC), scope=COLLECTION_GROUP),
    # lines (jobs/{id}/lines): invalid and duplicate line records
    QueryShape("api/operations: page_lines by outcome", LINES, equals=("outcome",)),
    # chunks
    QueryShape("ingest: count_done_chunks", CHUNKS, equals=("status",)),
    # events
    QueryShape("api/operations: page_events", EVENTS, range=("at", ASC)),
    # jobs
    QueryShape("api: list_jobs", JOBS, range=("created_at", DESC)),
    QueryShape("api: list_jobs by status", JOBS, equals=("status",), range=("created_at", DESC)),
    QueryShape("api: list_jobs by gcs_path", JOBS, equals=("gcs_path",), range=("created_at", DESC)),
    QueryShape("api: list_jobs by status and gcs_path", JOBS, equals=("status", "gcs_path"),
               range=("created_at", DESC)),
    QueryShape("sweeper running", JOBS, equals=("status",), range=("last_progress_at", ASC)),
    QueryShape("sweeper ingesting", JOBS, equals=("status",), range=("created_at", ASC)),
    QueryShape("sweeper progress_missed", JOBS, equals=("status",), range=("progress_check_missed_at", ASC)),
    QueryShape("sweeper flagged", JOBS, range=("stall.flagged_at", ASC)),
    # sweeper's own collections
    QueryShape("sweeper pending alerts", STALL_EVENTS, equals=("notify_state",), range=("detected_at", ASC)),
    QueryShape("sweeper systemic episodes", ALERT_STATE, range=("episode_at", ASC)),
)

# Queries people run (console, gcloud), not the code: kept indexed on purpose. Never on a HIGH_RATE
# collection (an index for a person's occasional query is not worth a write hot spot).
MANUAL_QUERIES: tuple[QueryShape, ...] = (
    QueryShape("operator: one job's stall history, oldest first (console; docs/operations.md, stall alerts)", STALL_EVENTS,
               equals=("job_id",), range=("detected_at", ASC)),
)


@dataclass(frozen=True)
class StoredField:
    """A top-level field of a high-rate collection. `sequential`: documents written close in time
    carry values close in index order (timestamps, line numbers), so indexing it hot-spots."""

    name: str
    sequential: bool


def _fields(*specs: tuple[str, bool]) -> tuple[StoredField, ...]:
    return tuple(StoredField(name, seq) for name, seq in specs)


FIELDS: dict[str, tuple[StoredField, ...]] = {
    # shared/item_state.py (new_item, claim, extend_lease, complete, cancel, requeue),
    # shared/operations.py (re-drive)
    ITEMS: _fields(
        ("job_id", False), ("gtin", True), ("upc", True), ("line", True), ("status", False),
        ("attempt", False), ("round", False), ("lease_owner", False), ("lease_shard", False),
        ("lease_expires_at", True), ("heartbeat_at", True), ("task_name", False), ("error", False),
        ("result", False), ("first_failed_at", True), ("history", True), ("created_at", True),
        ("updated_at", True), ("finished_at", True), ("cancelled_midway", False), ("redrive", True),
    ),
    # shared/ingest.py line records
    LINES: _fields(
        ("line", True), ("raw", False), ("outcome", False), ("code", False), ("reason", False),
        ("gtin", True), ("duplicate_of_line", True),
    ),
}


def needed_single_fields(collection_group: str) -> dict[str, set[tuple[str, str]]]:
    """field -> {(mode, scope)} of the single-field indexes the queries need on this collection group."""
    out: dict[str, set[tuple[str, str]]] = {}
    for q in QUERIES + MANUAL_QUERIES:
        if q.collection_group == collection_group:
            for field, mode, scope in q.single_fields():
                out.setdefault(field, set()).add((mode, scope))
    return out


def needed_composites() -> set[tuple[str, str, tuple[tuple[str, str], ...]]]:
    return {c for q in QUERIES + MANUAL_QUERIES if (c := q.composite()) is not None}


def field_overrides() -> list[dict]:
    """The `fieldOverrides` entries firestore.indexes.json must hold for the high-rate collections:
    per field exactly the single-field indexes a query needs (none: exempt)."""
    out = []
    for group in HIGH_RATE:
        needed = needed_single_fields(group)
        for f in FIELDS[group]:
            keep = sorted(needed.get(f.name, ()), key=lambda ms: (MODES.index(ms[0]), ms[1]))
            out.append({"collectionGroup": group, "fieldPath": f.name,
                        "indexes": [_mode_entry(mode, scope) for mode, scope in keep]})
    return out


def _mode_entry(mode: str, scope: str) -> dict:
    if mode == CONTAINS:
        return {"arrayConfig": CONTAINS, "queryScope": scope}
    return {"order": mode, "queryScope": scope}
