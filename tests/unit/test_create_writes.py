"""The fan-out's item-birth Writes (shared/store/create_writes.py) are exactly what the official client
would send for the same `create`."""

from __future__ import annotations

import datetime as dt

import pytest
from google.cloud.firestore_v1 import SERVER_TIMESTAMP, _helpers
from google.cloud.firestore_v1.types import write as write_types
from hypothesis import given
from hypothesis import strategies as st

from shared import item_state
from shared.model import ItemStatus
from shared.payloads import ItemTask
from shared.store.create_writes import create_write

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


@pytest.mark.parametrize("bad", [{1: "int key"}, {"m": {2: "int key"}}, {"": 1}, {"m": {"": 1}}])
def test_a_key_that_is_not_a_string_is_the_clients_to_refuse(bad):
    with pytest.raises(Exception) as ours:
        create_write(PATH, bad)
    with pytest.raises(Exception) as theirs:
        _client(bad)
    assert type(ours.value) is type(theirs.value)
