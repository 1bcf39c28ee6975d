"""firestore.indexes.json against the queries the code really issues (shared/store/indexes.py).

Static on purpose: the Firestore emulator ignores index definitions (it serves any query and never
hot-spots), so no emulator run can show a missing index or an indexed sequential field. What makes
the checks hard to fool:

- the queries are *recorded*: every query method of `FirestoreStore` runs against a recording
  client, and every declarative sweeper query goes through `FirestoreSweepStore.firestore_query`;
  a query method the test does not exercise fails the coverage check (found in the source);
- the fields are *found*: the item fields come from `new_item` and from every `Update(...)` in the
  modules that write items, the line fields from the ingest code that builds line records; a field
  written there and missing from `FIELDS` fails, and a field whose value is a timestamp, or whose
  name ends in `_at`, must be declared sequential;
- the file is compared both ways: an index no query needs, or a query whose index is missing or
  exempted, fails.
"""

from __future__ import annotations

import ast
import datetime as dt
import inspect
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from shared.model import ITEMS, LINES
from shared.store import indexes
from shared.store.indexes import ASC, COLLECTION, CONTAINS, DESC, FIELDS, HIGH_RATE, MODES, QUERIES, QueryShape

ROOT = Path(__file__).resolve().parents[2]
INDEX_FILE = ROOT / "firestore.indexes.json"
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _file() -> dict:
    return json.loads(INDEX_FILE.read_text())


def _file_composites() -> set:
    return {(ix["collectionGroup"], ix.get("queryScope", COLLECTION),
             tuple((f["fieldPath"], f.get("order") or CONTAINS) for f in ix["fields"]))
            for ix in _file()["indexes"]}


def _file_overrides() -> dict[tuple[str, str], set[tuple[str, str]] | None]:
    """(group, field) -> the single-field indexes its override keeps ({(mode, scope)}), for every override."""
    out = {}
    for fo in _file()["fieldOverrides"]:
        key = (fo["collectionGroup"], fo["fieldPath"])
        assert key not in out, f"field override {key} declared twice"
        out[key] = {(i.get("order") or i.get("arrayConfig"), i.get("queryScope", COLLECTION))
                    for i in fo.get("indexes", [])}
    return out


# ---------------------------------------------------------------------------------------- recording client


class _Recorder:
    def __init__(self):
        self.shapes: list[tuple[str, str, tuple[str, ...], tuple[str, str] | None]] = []


class _Query:
    """Enough of google.cloud.firestore's query surface to record what a store asks for."""

    def __init__(self, rec: _Recorder, group: str, scope: str, equals=(), range_=None):
        self.rec, self.group, self.scope, self.equals, self.range = rec, group, scope, tuple(equals), range_

    def _with(self, **kw):
        q = _Query(self.rec, self.group, self.scope, self.equals, self.range)
        for k, v in kw.items():
            setattr(q, k, v)
        return q

    def where(self, *args, filter=None):
        field, op = filter.field_path, filter.op_string
        if op in ("==", "in"):
            return self._with(equals=self.equals + (field,))
        assert self.range in (None, (field, ASC)), f"two range/order fields: {self.range}, {field}"
        return self._with(range=(field, ASC))

    def order_by(self, field, direction="ASCENDING"):
        if field == "__name__":
            return self
        direction = DESC if str(direction).upper().startswith("DESC") else ASC
        assert self.range in (None, (field, direction)), f"two range/order fields: {self.range}, {field}"
        return self._with(range=(field, direction))

    def start_after(self, *_):
        return self

    def limit(self, _n):
        return self

    def _record(self):
        self.rec.shapes.append((self.group, self.scope, tuple(sorted(set(self.equals))), self.range))

    def stream(self, *args, **kw):
        self._record()
        return iter(())

    def count(self, alias=None):
        self._record()
        return SimpleNamespace(get=lambda *a, **k: [[SimpleNamespace(value=0)]])


class _Doc:
    def __init__(self, rec, path):
        self.rec, self.path, self.id = rec, path, path.rsplit("/", 1)[-1]

    def collection(self, name):
        return _Collection(self.rec, f"{self.path}/{name}")

    def get(self, *a, **k):
        return SimpleNamespace(exists=True, id=self.id, to_dict=lambda: {}, update_time=None)


class _Collection(_Query):
    def __init__(self, rec, path):
        super().__init__(rec, path.rsplit("/", 1)[-1], COLLECTION)
        self.path = path

    def document(self, doc_id=None):
        return _Doc(self.rec, f"{self.path}/{doc_id or 'auto'}")


class _Db:
    def __init__(self):
        self.rec = _Recorder()

    def collection(self, path):
        return _Collection(self.rec, path)

    def collection_group(self, name):
        return _Query(self.rec, name, "COLLECTION_GROUP")


def _as_shape(group, scope, equals, range_) -> QueryShape:
    return QueryShape("recorded", group, equals=tuple(equals), range=range_, scope=scope)


def _declared() -> set:
    return {(q.collection_group, q.scope, tuple(sorted(set(q.equals))), q.range) for q in QUERIES}


# The FirestoreStore methods that query, with the argument combinations they take.
_STORE_CALLS = {
    "list_jobs": [dict(limit=5), dict(limit=5, status="running"), dict(limit=5, gcs_path="gs://b/o"),
                  dict(limit=5, status="running", gcs_path="gs://b/o"), dict(limit=5, after_job_id="j")],
    "page_events": [dict(job_id="j", limit=5), dict(job_id="j", limit=5, after_id="e")],
    "count_never_claimed": [dict(job_id="j")],
    "count_items_by_status": [dict(job_id="j")],
    "page_items": [dict(job_id="j", limit=5), dict(job_id="j", limit=5, status="failed"),
                   dict(job_id="j", limit=5, round_=2), dict(job_id="j", limit=5, status="failed", round_=2),
                   dict(job_id="j", limit=5, after_gtin="0001")],
    "page_items_by_line": [dict(job_id="j", limit=5), dict(job_id="j", limit=5, after_line=3)],
    "page_lines": [dict(job_id="j", limit=5), dict(job_id="j", limit=5, outcome="invalid"),
                   dict(job_id="j", limit=5, after_id="0000000003")],
    "count_done_chunks": [dict(job_id="j")],
}
# Methods whose source streams without a filter or order (no index): why each needs none.
_UNFILTERED = {"transact_job": "reads every chunk of one job inside the completion transaction"}


def _recorded_store_shapes() -> set:
    from shared.store.firestore import FirestoreStore

    db = _Db()
    store = FirestoreStore(db)
    for method, calls in _STORE_CALLS.items():
        for kw in calls:
            getattr(store, method)(**kw)
    return set(db.rec.shapes)


def _recorded_sweeper_shapes() -> set:
    from shared.config import load_settings
    from shared.sweeper import engine, plan, systemic
    from shared.sweeper.store import FirestoreSweepStore

    db = _Db()
    store = FirestoreSweepStore(db)
    cfg = load_settings()
    queries = list(engine.scan_queries().values()) + [systemic._episodes(10)]

    class Counting:
        def count(self, query, now, cfg):
            queries.append(query)
            return 0

    plan.never_claimed(Counting(), "j", {"totals": {"items": 3}}, NOW, cfg)
    for q in queries:
        store.firestore_query(q, NOW, cfg).stream()
    return set(db.rec.shapes)


def test_every_store_query_method_is_exercised():
    """A new query method in a store fails here until the test records it (and QUERIES declares it)."""
    from shared.store.firestore import FirestoreStore

    src = inspect.getsource(FirestoreStore)
    tree = ast.parse(src)
    querying = set()
    for fn in tree.body[0].body:  # the class's own methods (nested helpers belong to them)
        if isinstance(fn, ast.FunctionDef):
            body = ast.get_source_segment(src, fn) or ""
            if any(tok in body for tok in (".where(", ".order_by(", ".count(", ".stream(", "collection_group(")):
                querying.add(fn.name)
    assert querying == set(_STORE_CALLS) | set(_UNFILTERED)


def test_every_query_the_code_issues_is_declared():
    recorded = _recorded_store_shapes() | _recorded_sweeper_shapes()
    declared = _declared()
    # A query with no filter and no order (a whole collection, by document name) needs no index.
    unindexed = {s for s in recorded if not s[2] and s[3] is None}
    undeclared = recorded - declared - unindexed
    assert not undeclared, f"queries the code issues that shared/store/indexes.py does not declare: {undeclared}"
    # and nothing is declared that the code does not issue (a stale declaration keeps an index alive)
    unused = declared - recorded
    assert not unused, f"declared queries the code never issues: {unused}"


def test_every_composite_index_serves_a_declared_query_and_each_query_has_its_composite():
    needed = indexes.needed_composites()
    got = _file_composites()
    assert needed - got == set(), f"composite indexes missing from firestore.indexes.json: {needed - got}"
    assert got - needed == set(), f"composite indexes no declared query needs: {got - needed}"


def test_each_sweeper_rule_names_the_index_its_query_uses():
    from shared.sweeper import rules

    got = _file_composites()
    for rule in rules.RULES:
        if rule.index is not None:
            spec = (rule.index.collection_group, rule.index.query_scope, tuple((f, ASC) for f in rule.index.fields))
            assert spec in got, f"rule {rule.name}: index {spec} is not in firestore.indexes.json"


def test_manual_queries_stay_off_high_rate_collections():
    assert all(q.collection_group not in HIGH_RATE for q in indexes.MANUAL_QUERIES)


def test_no_override_exempts_an_index_a_query_needs():
    overrides = _file_overrides()
    for q in QUERIES + indexes.MANUAL_QUERIES:
        for field, mode, scope in q.single_fields():
            kept = overrides.get((q.collection_group, field))
            if kept is None:
                assert scope == COLLECTION and mode in (ASC, DESC), (
                    f"{q.name}: needs {field} {mode} {scope}, which is not automatic: declare it in fieldOverrides")
                continue
            assert (mode, scope) in kept, f"{q.name}: needs {q.collection_group}.{field} {mode} {scope}, exempted"


def test_high_rate_fields_keep_exactly_the_indexes_queries_need():
    """Every field of items and lines has an override; it keeps what a query needs and nothing else."""
    overrides = _file_overrides()
    for group in HIGH_RATE:
        needed = indexes.needed_single_fields(group)
        for f in FIELDS[group]:
            assert (group, f.name) in overrides, f"{group}.{f.name} has no field override (it would be indexed)"
            kept = overrides[(group, f.name)]
            assert kept == needed.get(f.name, set()), (
                f"{group}.{f.name} keeps {sorted(kept)}, queries need {sorted(needed.get(f.name, set()))}")
            for mode, _ in kept:
                assert mode in MODES
        for (g, name) in overrides:
            if g == group:
                assert name in {f.name for f in FIELDS[group]}, f"override for undeclared field {group}.{name}"
    assert indexes.field_overrides() == [fo for fo in _file()["fieldOverrides"] if fo["collectionGroup"] in HIGH_RATE]


def test_sequential_high_rate_fields_are_indexed_only_where_a_query_needs_them():
    """The rule the file must obey, stated directly: a sequential field keeps an index only for a query."""
    overrides = _file_overrides()
    for group in HIGH_RATE:
        needed = indexes.needed_single_fields(group)
        for f in FIELDS[group]:
            if f.sequential:
                assert overrides[(group, f.name)] <= needed.get(f.name, set()), f"{group}.{f.name}"


# ---------------------------------------------------------------------------------------- fields written


def _update_keys(path: Path) -> set[str]:
    """Top-level keys of every `Update(...)` the module builds: a dict literal argument, or the
    `fields` dict its function builds (literal, `fields.update({...})`, `fields["k"] = ...`)."""
    src = path.read_text()
    tree = ast.parse(src)
    keys: set[str] = set()

    def dict_keys(d: ast.Dict) -> set[str]:
        return {k.value for k in d.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}

    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        names: set[str] = set()
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "Update":
                for arg in node.args:
                    if isinstance(arg, ast.Dict):
                        keys |= dict_keys(arg)
                    elif isinstance(arg, ast.Name):
                        names.add(arg.id)
        for node in ast.walk(fn):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name) and t.id in names and isinstance(node.value, ast.Dict):
                        keys |= dict_keys(node.value)
                    if (isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id in names
                            and isinstance(t.slice, ast.Constant)):
                        keys.add(t.slice.value)
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in names):
                for arg in node.args:
                    if isinstance(arg, ast.Dict):
                        keys |= dict_keys(arg)
    return keys


def _born_item() -> dict:
    from shared.item_state import new_item
    from shared.model import ItemStatus
    from shared.payloads import ItemTask

    task = ItemTask(job_id="j", gtin="00012345678905", upc="012345678905", line=7, round=1)
    return new_item(task, "t", NOW, ItemStatus.PROCESSING, attempt=1, owner="o", lease_until=NOW)


def test_every_item_field_written_is_declared():
    declared = {f.name for f in FIELDS[ITEMS]}
    born = _born_item()
    written = set(born) | _update_keys(ROOT / "shared" / "item_state.py") | _update_keys(ROOT / "shared" / "operations.py")
    assert written - declared == set(), f"item fields written but not in shared/store/indexes.py FIELDS: {written - declared}"
    assert declared - written == set(), f"declared item fields nothing writes: {declared - written}"
    assert len(written) > 15  # the scan found the writers


def test_every_line_record_field_written_is_declared():
    src = (ROOT / "shared" / "ingest.py").read_text()
    tree = ast.parse(src)
    written: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            if {"line", "raw", "outcome"} <= keys:  # a line record
                written |= keys
    assert written == {f.name for f in FIELDS[LINES]}


def test_timestamps_are_declared_sequential():
    """A field can't be declared non-sequential to dodge the exemption: any datetime value, or `_at` name, is."""
    born = _born_item()
    seq = {f.name: f.sequential for f in FIELDS[ITEMS]}
    for name, value in born.items():
        if isinstance(value, dt.datetime):
            assert seq[name], f"items.{name} holds a timestamp: declare it sequential"
    for group in HIGH_RATE:
        for f in FIELDS[group]:
            if f.name.endswith("_at"):
                assert f.sequential, f"{group}.{f.name}"
    # line numbers and GTINs of a sorted file rise with the fan-out's write order
    assert seq["line"] and seq["gtin"] and seq["upc"]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["fieldOverrides"].pop(0), "no field override"),
    (lambda d: d["fieldOverrides"][3]["indexes"].append({"order": "DESCENDING", "queryScope": "COLLECTION"}), "keeps"),
    (lambda d: d["fieldOverrides"][3].update(indexes=[]), "exempted"),
])
def test_the_checks_catch_a_broken_file(tmp_path, monkeypatch, mutate, message):
    """Proof the checks bite: an override removed, an extra index kept, a needed index exempted."""
    data = _file()
    assert data["fieldOverrides"][3]["fieldPath"] == "line"  # items.line: ASC for the results query
    mutate(data)
    broken = tmp_path / "firestore.indexes.json"
    broken.write_text(json.dumps(data))
    monkeypatch.setattr(sys.modules[__name__], "INDEX_FILE", broken)
    with pytest.raises(AssertionError, match=message):
        test_no_override_exempts_an_index_a_query_needs()
        test_high_rate_fields_keep_exactly_the_indexes_queries_need()
