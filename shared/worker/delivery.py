"""One Cloud Tasks delivery of an item task, as its headers describe it, and the clock it runs by."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class TaskDelivery:
    """One delivery of a task, from Cloud Tasks headers; `owner` is unique per delivery."""

    task_name: str
    retry_count: int
    execution_count: int
    owner: str
    last_attempt: bool

    @classmethod
    def from_headers(cls, headers: Mapping[str, str] | None, max_attempts: int) -> "TaskDelivery":
        lowered = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
        task_name = lowered.get("x-cloudtasks-taskname", "") or "direct"
        retry_count = _int_header(lowered.get("x-cloudtasks-taskretrycount"))
        execution_count = _int_header(lowered.get("x-cloudtasks-taskexecutioncount"))
        owner = f"{task_name}:{retry_count}:{uuid.uuid4().hex[:8]}"
        # -1 (or 0): unlimited attempts, so no delivery is the last one; the item's retry window
        # (shared/item_state.complete) decides when a retryable failure ends the item.
        last_attempt = max_attempts > 0 and retry_count + 1 >= max_attempts
        return cls(task_name, retry_count, execution_count, owner, last_attempt)


def _int_header(raw: str | None) -> int:
    try:
        return max(0, int(raw or 0))
    except ValueError:
        return 0


def utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)


class Clock:
    """Wall time, or a fake start time (`now=`) advanced by real elapsed time."""

    def __init__(self, now: float | dt.datetime | None):
        if isinstance(now, dt.datetime):
            now = (now if now.tzinfo else now.replace(tzinfo=dt.timezone.utc)).timestamp()
        self._offset = (now - time.time()) if now is not None else 0.0

    def __call__(self) -> float:
        return time.time() + self._offset

    def at(self) -> dt.datetime:
        return utc(self())
