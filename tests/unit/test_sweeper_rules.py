"""The hard rule, checked on the source of the whole shared/sweeper package: only the store's
`write_*` methods (and the `_write_*` helpers they apply) write, and they touch only
`jobs/{id}.stall`, job events, `stall_events` and `alert_state`; no items, no tasks."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import shared.sweeper
from shared.sweeper import store

WRITE_METHODS = {"set", "update", "create", "delete", "commit", "add", "transaction", "bulk_writer",
                 "recursive_delete"}
PACKAGE = Path(shared.sweeper.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))
STORE = PACKAGE / "store.py"
COLLECTIONS = {"JOBS", "ITEMS", "CHUNKS", "LINES", "EVENTS", "STALL_EVENTS", "ALERT_STATE"}
WRITABLE = {"JOBS", "EVENTS", "STALL_EVENTS", "ALERT_STATE"}


def _is_writer(name: str) -> bool:
    return name.startswith(("write_", "_write_"))


def _calls_with_function(tree):
    """(innermost enclosing function name or None, call node) for every call in a module."""
    def visit(node, fname):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from visit(child, child.name)
            else:
                if isinstance(child, ast.Call):
                    yield fname, child
                yield from visit(child, fname)
    yield from visit(tree, None)


def _writers():
    tree = ast.parse(STORE.read_text())
    return {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and _is_writer(n.name)}


def test_only_write_functions_call_write_methods():
    assert len(MODULES) >= 10  # the whole package is audited, rules included
    offenders = set()
    for path in MODULES:
        for fname, call in _calls_with_function(ast.parse(path.read_text())):
            if isinstance(call.func, ast.Attribute) and call.func.attr in WRITE_METHODS:
                if path == STORE and fname is not None and _is_writer(fname):
                    continue
                offenders.add((path.relative_to(PACKAGE).as_posix(), fname, call.func.attr, call.lineno))
    assert not offenders, f"writes outside the store's write_* methods: {sorted(offenders)}"


def test_write_methods_live_only_in_the_store():
    elsewhere = {(p.name, n.name) for p in MODULES if p != STORE for n in ast.walk(ast.parse(p.read_text()))
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_writer(n.name)}
    assert not elsewhere


def test_writers_are_narrow():
    writers = _writers()
    assert {"write_job_groups", "write_together", "write_notify_outcomes", "_write_job_stall", "_write_job_event",
            "_write_stall_event", "_write_alert_state"} <= set(writers)
    src = {name: ast.get_source_segment(STORE.read_text(), node) for name, node in writers.items()}
    assert '{"stall": op.stall}' in src["_write_job_stall"] and "last_update_time" in src["_write_job_stall"]
    for name, node in writers.items():
        named = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} & COLLECTIONS
        assert named <= WRITABLE, (name, named)
    for name in ("_write_stall_event", "write_notify_outcomes"):
        assert "STALL_EVENTS" in src[name]
    assert "ALERT_STATE" in src["_write_alert_state"] and "EVENTS" in src["_write_job_event"]


def test_the_only_write_requests_are_flags_events_records_and_alert_state():
    assert set(typing.get_args(store.Write)) == {store.SetStallFlag, store.AddJobEvent, store.AddStallEvent,
                                                 store.MergeAlertState}
    assert set(store.JOB_EVENT_TYPES) == {"stall_flagged", "stall_recovered"}


def test_no_task_or_status_writes_anywhere():
    for path in MODULES:
        text = path.read_text()
        tree = ast.parse(text)
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not {"tasks", "shared.tasks", "tasks_client", "tasks_v2", "google.cloud.tasks_v2"} & imported, path
        for forbidden in ('"status":', '"counts":', '"totals":', "create_task", "delete_task"):
            assert forbidden not in text, (path, forbidden)


def test_job_stall_writer_refuses_other_fields():
    calls = []

    class Batch:
        def update(self, ref, data, option=None):
            calls.append((ref, data, option))

    class Ref:
        def __init__(self, path):
            self.path = path

        def document(self, d):
            return Ref(f"{self.path}/{d}")

    class Db:
        def collection(self, c):
            return Ref(c)

        def write_option(self, **kw):
            return kw

    store.FirestoreSweepStore(Db())._write_job_stall(Batch(), store.SetStallFlag("j1", None, "t"))
    [(ref, data, option)] = calls
    assert ref.path == "jobs/j1" and data == {"stall": None} and option == {"last_update_time": "t"}


def test_audit_catches_a_write_outside_the_store(tmp_path):
    """The audit itself: a module-level or engine-side write is found."""
    sneaky = "def plan(db):\n    db.collection('jobs').document('j').update({'x': 1})\nbatch.commit()\n"
    found = [(f, c.func.attr) for f, c in _calls_with_function(ast.parse(sneaky))
             if isinstance(c.func, ast.Attribute) and c.func.attr in WRITE_METHODS]
    assert found == [("plan", "update"), (None, "commit")]
