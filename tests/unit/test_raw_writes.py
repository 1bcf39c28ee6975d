"""The item documents' Writes built on the raw protobuf (shared/store/raw_writes.py) are exactly what
the official client would send for the same `create` or `update`."""

from __future__ import annotations

import datetime as dt

import pytest
from google.api_core.datetime_helpers import DatetimeWithNanoseconds
from google.cloud.firestore_v1 import DELETE_FIELD, SERVER_TIMESTAMP, _helpers
from google.cloud.firestore_v1.types import write as write_types
from hypothesis import given
from hypothesis import strategies as st

from shared import item_state
from shared.exceptions import PermanentItemError, RetryableItemError
from shared.model import Item, ItemStatus
from shared.payloads import ItemTask
from shared.store.raw_writes import create_write, update_write

PATH = "projects/p/databases/(default)/documents/jobs/j/items/00012345678905"
AT = dt.datetime(2026, 11, 30, 16, 20, 1, 123456, tzinfo=dt.timezone.utc)


def _client(data: dict) -> write_types.Write:
    (write,) = _helpers.pbs_for_create(PATH, data)
    return write


def _same(data: dict) -> None:
    ours = create_write(PATH, data)
    assert isinstance(ours, write_types.Write)
    assert write_types.Write.pb(ours) == write_types.Write.pb(_client(data))


def test_an_item_born_at_fan_out_is_encoded_as_the_client_encodes_it():
    task = ItemTask(job_id="j", gtin="00012345678905", upc="012345678905", line=7, round=1)
    _same(item_state.born_queued(task, "j-t-00012345678905-r1", AT, owner="fanout:j-c-0"))
    _same(item_state.new_item(task, "t", AT, ItemStatus.CANCELLED, attempt=0, owner="o", error_code="job_cancelled"))


def test_edge_values_match_the_client():
    naive = dt.datetime(2026, 1, 2, 3, 4, 5, 6)  # the client takes a naive datetime as UTC
    other_zone = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    _same({"none": None, "t": True, "f": False, "zero": 0, "neg": -2**63, "big": 2**63 - 1, "pi": 3.5,
           "empty_str": "", "unicode": "é\u2028", "naive": naive, "zone": other_zone, "empty_map": {},
           "empty_list": [], "nested": {"a": {"b": [1, {"c": None}, []]}}, "dotted.key": 1, "tuple": (1, "x")})
    _same({})


def test_what_it_does_not_encode_is_left_to_the_client():
    data = {"at": SERVER_TIMESTAMP, "raw": b"\x00\x01"}
    assert write_types.Write.pb(create_write(PATH, {"raw": b"\x00"})) == write_types.Write.pb(_client({"raw": b"\x00"}))
    ours = create_write(PATH, data)  # a sentinel becomes a transform: the client's own Write
    assert write_types.Write.pb(ours) == write_types.Write.pb(_client(data))


_plain = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.datetimes(timezones=st.just(dt.timezone.utc)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12)


@given(st.dictionaries(st.text(max_size=6), _plain, max_size=6))
def test_any_plain_document_matches_the_client(data):
    try:
        expected = write_types.Write.pb(_client(data))
    except ValueError:  # e.g. an empty key: refused the same way
        with pytest.raises(ValueError):
            create_write(PATH, data)
        return
    assert write_types.Write.pb(create_write(PATH, data)) == expected


# ----------------------------------------------------------------------------------------- update


def _client_update(fields: dict) -> write_types.Write:
    (write,) = _helpers.pbs_for_update(PATH, fields, None)
    return write


def _same_update(fields: dict) -> None:
    ours = update_write(PATH, fields)
    assert isinstance(ours, write_types.Write)
    assert write_types.Write.pb(ours) == write_types.Write.pb(_client_update(fields))


def _read_back(doc: dict) -> Item:
    """The item as a transaction reads it: its timestamps come back as the client's
    DatetimeWithNanoseconds, nanoseconds included."""
    def back(value):
        if isinstance(value, dt.datetime):
            return DatetimeWithNanoseconds(value.year, value.month, value.day, value.hour, value.minute,
                                           value.second, nanosecond=value.microsecond * 1000 + 789,
                                           tzinfo=dt.timezone.utc)
        if isinstance(value, dict):
            return {k: back(v) for k, v in value.items()}
        if isinstance(value, list):
            return [back(v) for v in value]
        return value
    return Item.from_doc(back(doc), doc["gtin"])


def test_the_workers_claim_and_complete_updates_are_encoded_as_the_client_encodes_them():
    task = ItemTask(job_id="j", gtin="00012345678905", upc="012345678905", line=7, round=1)
    born = _read_back(item_state.born_queued(task, "j-t-00012345678905-r1", AT, owner="fanout:j-c-0"))
    until = AT + dt.timedelta(seconds=60)
    _claim, claimed = item_state.claim(born, task, "t", "owner-1", AT, until)
    _same_update(claimed.fields)
    processing = _read_back({**born.doc, **claimed.fields})
    for outcome in (item_state.HandlerOutcome(result={"draft_id": "d-1", "nested": {"a": [1, None]}}),
                    item_state.HandlerOutcome(result={}),
                    item_state.HandlerOutcome(error=PermanentItemError("no such product", code="not_found")),
                    item_state.HandlerOutcome(error=RetryableItemError("timed out", code="timeout"))):
        _kind, completed = item_state.complete(processing, "owner-1", AT, outcome)
        _same_update(completed.fields)
    _ok, beat = item_state.extend_lease(processing, "owner-1", AT, until)
    _same_update(beat.fields)


def test_update_edge_values_match_the_client():
    _same_update({"none": None, "empty_map": {}, "empty_list": [], "nested": {"a.b": {"c": [1, {}]}},
                  "zone": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2))),
                  "nanos": DatetimeWithNanoseconds(2026, 1, 2, 3, 4, 5, nanosecond=123456789, tzinfo=dt.timezone.utc),
                  "_under": 1, "z": 2, "A": 3})


@pytest.mark.parametrize("fields", [
    {"a.b": 1},  # a dotted name is a nested path in an update
    {"`quoted`": 1, "x": 2},
    {"needs quoting": 1},
    {"at": SERVER_TIMESTAMP, "x": 1},  # a transform
    {"gone": DELETE_FIELD, "x": 1},  # a field in the mask with no value
    {"raw": b"\x00"},
])
def test_what_the_update_does_not_encode_is_left_to_the_client(fields):
    _same_update(fields)


_REFUSED = [("create", bad) for bad in ({1: "int key"}, {"m": {2: "int key"}}, {"": 1}, {"m": {"": 1}})] + \
           [("update", bad) for bad in ({}, {"": 1}, {"m": {2: "int key"}})]


@pytest.mark.parametrize("write, bad", _REFUSED)
def test_what_the_client_refuses_is_refused_the_same_way(write, bad):
    ours_fn, theirs_fn = (create_write, _client) if write == "create" else (update_write, _client_update)
    with pytest.raises(Exception) as ours:
        ours_fn(PATH, bad)
    with pytest.raises(Exception) as theirs:
        theirs_fn(bad)
    assert type(ours.value) is type(theirs.value)


_field_name = st.from_regex(r"[_a-zA-Z][_a-zA-Z0-9]{0,5}", fullmatch=True)


@given(st.dictionaries(_field_name | st.text(max_size=6), _plain, min_size=1, max_size=6))
def test_any_plain_update_matches_the_client(fields):
    try:
        expected = write_types.Write.pb(_client_update(fields))
    except ValueError:  # e.g. an empty or conflicting field path: refused the same way
        with pytest.raises(ValueError):
            update_write(PATH, fields)
        return
    assert write_types.Write.pb(update_write(PATH, fields)) == expected


def test_a_transactions_item_snapshot_is_read_without_the_deep_copy_and_equals_to_dict():
    from google.cloud.firestore_v1.base_document import DocumentSnapshot

    from shared.store.firestore import _snapshot_data

    task = ItemTask(job_id="j", gtin="00012345678905", upc="012345678905", line=7, round=1)
    write = write_types.Write.pb(create_write(PATH, item_state.born_queued(task, "t", AT, owner="o")))
    data = _helpers.decode_dict(write_types.Write.wrap(write).update.fields, client=None)
    snap = DocumentSnapshot(None, data, True, None, None, None)
    assert _snapshot_data(snap) == snap.to_dict()
    assert _snapshot_data(snap) is snap._data  # not a copy: the point of it
