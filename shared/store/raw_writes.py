"""Firestore `create` and `update` Writes built directly on the protobuf classes, for the item
documents' hot paths: births at fan-out, and the worker's claim and complete transactions.

The official client builds each Write through proto-plus (`_helpers.pbs_for_create`,
`pbs_for_update`): a wrapper object and a marshal lookup per field value. Profiled on the fan-out,
that encoding was more than half of the ingest process's CPU per item (an item document has ~20
fields), more than the CreateTask call itself; in the worker it was the largest part of what a
delivery costs beyond its two bare transactions. Here the same Write is filled in place on the raw
protobuf message, which the client then sends unchanged (`Write.wrap` takes the message without a
copy).

Only plain values take this path (None, bool, int, float, str, datetime, the client's own
DatetimeWithNanoseconds read back from a document, dict, list, tuple), and for an update only
top-level field names that need no quoting. Anything else (sentinels such as SERVER_TIMESTAMP,
bytes, GeoPoint, dotted or quoted field paths) is encoded by the client, so the result is always
what the client would send: tests/unit/test_raw_writes.py compares the two message for message.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from google.api_core.datetime_helpers import DatetimeWithNanoseconds
from google.cloud.firestore_v1 import _helpers
from google.cloud.firestore_v1.types import write as write_types


class _NotPlain(Exception):
    """A value this encoder leaves to the client."""


def _fill(pb: Any, value: Any) -> None:
    """Set the raw `Value` message `pb` to `value`, as `_helpers.encode_value` would."""
    kind = type(value)
    if value is None:
        pb.null_value = 0  # google.protobuf.NullValue.NULL_VALUE
    elif kind is bool:  # before int: bool is an int
        pb.boolean_value = value
    elif kind is int:
        pb.integer_value = value
    elif kind is str:
        pb.string_value = value
    elif kind is float:
        pb.double_value = value
    elif kind is dt.datetime:
        pb.timestamp_value.FromDatetime(value)
    elif kind is DatetimeWithNanoseconds:  # read back from Firestore (e.g. in an item's history): keeps its nanoseconds
        pb.timestamp_value.CopyFrom(value.timestamp_pb())
    elif kind is dict:
        fields = pb.map_value.fields
        if not value:
            pb.map_value.SetInParent()
        for key, item in value.items():
            if type(key) is not str or not key:  # the client refuses those: let it say so
                raise _NotPlain(key)
            _fill(fields[key], item)
    elif kind is list or kind is tuple:
        values = pb.array_value.values
        if not value:
            pb.array_value.SetInParent()
        for item in value:
            _fill(values.add(), item)
    else:
        raise _NotPlain(kind)


def _document_write(document_path: str, data: dict[str, Any], *, exists: bool) -> Any | None:
    """The raw Write setting `data` on `document_path` with precondition `exists`; None when a key or
    a value is not plain (then the client encodes the whole Write)."""
    raw = write_types.Write.pb()()
    raw.current_document.exists = exists
    raw.update.name = document_path
    fields = raw.update.fields
    try:
        for key, value in data.items():
            if type(key) is not str or not key:
                raise _NotPlain(key)
            _fill(fields[key], value)
    except _NotPlain:
        return None
    return raw


def create_write(document_path: str, data: dict[str, Any]) -> write_types.Write:
    """The Write that creates `document_path` with `data` only if it does not exist yet."""
    raw = _document_write(document_path, data, exists=False)
    if raw is None:
        (client_write,) = _helpers.pbs_for_create(document_path, data)
        return client_write
    return write_types.Write.wrap(raw)


# A field name the client sends in an update mask as it is (`FieldPath.to_api_repr` quotes any other).
_SIMPLE_FIELD = re.compile(r"[_a-zA-Z][_a-zA-Z0-9]*")


def update_write(document_path: str, fields: dict[str, Any]) -> write_types.Write:
    """The Write of `DocumentReference.update(fields)`: sets exactly these top-level fields (a dict
    value replaces the whole map) of a document that must exist."""
    simple = fields and all(type(key) is str and _SIMPLE_FIELD.fullmatch(key) for key in fields)
    raw = _document_write(document_path, fields, exists=True) if simple else None
    if raw is None:
        return _client_update(document_path, fields)
    raw.update_mask.field_paths.extend(sorted(fields))  # the client sends the mask sorted
    return write_types.Write.wrap(raw)


def _client_update(document_path: str, fields: dict[str, Any]) -> write_types.Write:
    (client_write,) = _helpers.pbs_for_update(document_path, fields, None)
    return client_write
