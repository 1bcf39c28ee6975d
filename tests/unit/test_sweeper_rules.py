"""The hard rule, checked on the source: the sweeper writes only through its `_write_*` functions,
which touch only `jobs/{id}.stall`, job events, `stall_events` and `alert_state`; no tasks."""

from __future__ import annotations

import ast
import inspect

from shared import sweeper

WRITE_METHODS = {"set", "update", "create", "delete", "commit", "add", "transaction", "bulk_writer",
                 "recursive_delete"}
ALLOWED_WRITERS = {"_write_job_stall", "_write_job_event", "_write_stall_event", "_write_mark_stall_events",
                   "_write_alert_state"}


def _tree():
    return ast.parse(inspect.getsource(sweeper))


def _enclosing_functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for child in ast.walk(node):
                yield node.name, child


def test_only_write_functions_call_write_methods():
    offenders = set()
    for fname, node in _enclosing_functions(_tree()):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WRITE_METHODS:
            if fname in ALLOWED_WRITERS:
                continue
            # batch.commit() is allowed in the handlers: the batch only holds _write_* operations
            if node.func.attr == "commit" and isinstance(node.func.value, ast.Name) and node.func.value.id == "batch":
                continue
            offenders.add((fname, node.func.attr, node.lineno))
    assert not offenders, f"writes outside the _write_* functions: {sorted(offenders)}"


def test_writers_are_narrow():
    src = {name: inspect.getsource(getattr(sweeper, name)) for name in ALLOWED_WRITERS}
    assert '{"stall": stall}' in src["_write_job_stall"] and "last_update_time" in src["_write_job_stall"]
    assert "ITEMS" not in "".join(src.values())
    for name in ("_write_stall_event", "_write_mark_stall_events"):
        assert "STALL_EVENTS" in src[name]
    assert "ALERT_STATE" in src["_write_alert_state"] and "EVENTS" in src["_write_job_event"]


def test_no_task_or_status_writes_anywhere():
    text = inspect.getsource(sweeper)
    tree = _tree()
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not {"tasks", "shared.tasks", "tasks_client", "tasks_v2", "google.cloud.tasks_v2"} & imported
    for forbidden in ('"status":', '"counts":', '"totals":', "create_task", "delete_task"):
        assert forbidden not in text, forbidden


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

    sweeper._write_job_stall(Db(), Batch(), "j1", None, "t")
    [(ref, data, option)] = calls
    assert ref.path == "jobs/j1" and data == {"stall": None} and option == {"last_update_time": "t"}
