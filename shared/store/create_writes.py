"""Firestore `create` Writes built directly on the protobuf classes, for the fan-out's item births.

The official client builds each Write through proto-plus (`_helpers.pbs_for_create`): a wrapper
object and a marshal lookup per field value. Profiled on the fan-out, that encoding was more than
half of the ingest process's CPU per item (an item document has ~20 fields), more than the
CreateTask call itself. Here the same Write is filled in place on the raw protobuf message, which
the client then sends unchanged (`Write.wrap` takes the message without a copy).

Only plain values take this path (None, bool, int, float, str, datetime, dict, list). A document
with anything else (sentinels such as SERVER_TIMESTAMP, bytes, GeoPoint, nanosecond timestamps) is
encoded by the client, so the result is always what the client would send:
tests/unit/test_create_writes.py compares the two message for message.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

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
    elif kind is dt.datetime:  # exactly datetime: the client's DatetimeWithNanoseconds keeps nanoseconds
        pb.timestamp_value.FromDatetime(value)
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


def create_write(document_path: str, data: dict[str, Any]) -> write_types.Write:
    """The Write that creates `document_path` with `data` only if it does not exist yet."""
    raw = write_types.Write.pb()()
    raw.current_document.exists = False
    raw.update.name = document_path
    fields = raw.update.fields
    try:
        for key, value in data.items():
            if type(key) is not str or not key:
                raise _NotPlain(key)
            _fill(fields[key], value)
    except _NotPlain:
        (client_write,) = _helpers.pbs_for_create(document_path, data)
        return client_write
    return write_types.Write.wrap(raw)
