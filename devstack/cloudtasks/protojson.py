"""proto3 JSON helpers: RFC 3339 timestamps, "1.5s" durations, enums by name or number."""

from __future__ import annotations

import enum
import re
from datetime import datetime, timezone
from typing import TypeVar

from devstack.cloudtasks.errors import invalid

_TS_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:\d{2})$"
)



class HttpMethod(enum.IntEnum):
    """google.cloud.tasks.v2.HttpMethod."""

    HTTP_METHOD_UNSPECIFIED = 0
    POST = 1
    GET = 2
    HEAD = 3
    PUT = 4
    DELETE = 5
    PATCH = 6
    OPTIONS = 7


class QueueState(enum.IntEnum):
    """google.cloud.tasks.v2.Queue.State."""

    STATE_UNSPECIFIED = 0
    RUNNING = 1
    PAUSED = 2
    DISABLED = 3


class TaskView(enum.IntEnum):
    """google.cloud.tasks.v2.Task.View: BASIC leaves the request body out."""

    VIEW_UNSPECIFIED = 0
    BASIC = 1
    FULL = 2


ProtoEnum = TypeVar("ProtoEnum", bound=enum.IntEnum)


def parse_timestamp(value, field: str) -> float:
    if not isinstance(value, str):
        raise invalid(f"Invalid value at '{field}': expected an RFC 3339 timestamp string")
    m = _TS_RE.match(value.strip())
    if not m:
        raise invalid(f"Invalid value at '{field}' ({value!r}): expected an RFC 3339 timestamp")
    y, mo, d, h, mi, s, frac, tz = m.groups()
    try:
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=timezone.utc)
    except ValueError as exc:
        raise invalid(f"Invalid value at '{field}' ({value!r}): {exc}") from None
    ts = dt.timestamp()
    if frac:
        ts += int(frac.ljust(9, "0")) / 1e9
    if tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        ts -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return ts


def format_timestamp(ts: float) -> str:
    """RFC 3339 UTC with microseconds (Cloud Tasks truncates times to the microsecond)."""
    micros = int(round(ts * 1_000_000))
    secs, us = divmod(micros, 1_000_000)
    dt = datetime.fromtimestamp(secs, tz=timezone.utc)
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{us:06d}Z" if us else f"{base}Z"


def parse_duration(value, field: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise invalid(f"Invalid value at '{field}' ({value!r}): durations are strings such as \"10s\"")
    if not isinstance(value, str) or not re.match(r"^-?\d+(\.\d{1,9})?s$", value.strip()):
        raise invalid(f"Invalid value at '{field}' ({value!r}): expected a duration such as \"10s\" or \"0.5s\"")
    return float(value.strip()[:-1])


def format_duration(seconds: float) -> str:
    nanos = int(round(seconds * 1e9))
    secs, frac = divmod(abs(nanos), 1_000_000_000)
    sign = "-" if nanos < 0 else ""
    if frac == 0:
        return f"{sign}{secs}s"
    if frac % 1_000_000 == 0:
        return f"{sign}{secs}.{frac // 1_000_000:03d}s"
    if frac % 1000 == 0:
        return f"{sign}{secs}.{frac // 1000:06d}s"
    return f"{sign}{secs}.{frac:09d}s"


def parse_enum(value, kind: type[ProtoEnum], field: str) -> ProtoEnum:
    """A proto3 JSON enum value: its name, its number, or its number as a string."""
    numbers = {member.value for member in kind}
    if isinstance(value, bool):
        raise invalid(f"Invalid value at '{field}' ({value!r})")
    if isinstance(value, int):
        if value in numbers:
            return kind(value)
        raise invalid(f"Invalid value at '{field}' ({value}): unknown enum number")
    if isinstance(value, str):
        if value in kind.__members__:
            return kind[value]
        if value.isdigit() and int(value) in numbers:
            return kind(int(value))
    raise invalid(f"Invalid value at '{field}' ({value!r}): expected one of {', '.join(kind.__members__)}")


def enum_out(value: enum.IntEnum, as_int: bool) -> int | str:
    """An enum in a response: its number with `$alt=json;enum-encoding=int`, else its name."""
    return int(value) if as_int else value.name


def parse_int(value, field: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool):
        raise invalid(f"Invalid value at '{field}' ({value!r}): expected an integer")
    if isinstance(value, str) and re.match(r"^-?\d+$", value.strip()):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise invalid(f"Invalid value at '{field}' ({value!r}): expected an integer")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise invalid(f"Invalid value at '{field}' ({value}): must be in [{lo}, {hi}]")
    return value


def parse_float(value, field: str) -> float:
    if isinstance(value, bool):
        raise invalid(f"Invalid value at '{field}' ({value!r}): expected a number")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise invalid(f"Invalid value at '{field}' ({value!r}): expected a number")


def expect_obj(value, field: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"Invalid value at '{field}': expected a JSON object")
    return value


def expect_str(value, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise invalid(f"Invalid value at '{field}' ({value!r}): expected a string")
    return value
