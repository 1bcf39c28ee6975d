"""The bodies of every task kind, one model each, shared by the code that creates a task and the code that
receives it: a field added on one side cannot be missed on the other."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

_JOB_ID = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.-]+$")


class TaskPayload(BaseModel):
    """Base of task bodies: unknown fields are ignored (an older producer's extras never fail a task)."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True, frozen=True)

    def to_body(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ItemTask(TaskPayload):
    """One UPC of one job in one round: the worker's item task (`task_name_for(job_id, gtin, round)`)."""

    job_id: str = _JOB_ID
    gtin: str = Field(pattern=r"^[0-9]{14}$")
    upc: str = Field(min_length=1, max_length=100)
    line: int = Field(ge=1)
    round: int = Field(ge=1)


class PlanTask(TaskPayload):
    """Plan a job's file (one streaming pass, chunk tasks out): ingest's `/plan` task. Only the job id:
    what to read (bucket, object, generation) comes from the job document."""

    job_id: str = _JOB_ID


class ChunkTask(TaskPayload):
    """A byte range [start, end) of one object generation: ingest's `/fanout` task."""

    job_id: str = _JOB_ID
    bucket: str = Field(min_length=1)
    object: str = Field(min_length=1)
    generation: str = Field(pattern=r"^[0-9]+$")
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    first_line: int = Field(ge=1)
    index: int | None = Field(default=None, ge=0)


class ProgressTask(TaskPayload):
    """A job's progress / completion check: the worker's `/progress` task."""

    job_id: str = _JOB_ID


class ResultsTask(TaskPayload):
    """Write a finished job's results manifest: the ingest function's `/results` task."""

    job_id: str = _JOB_ID
    round: int = Field(default=1, ge=1)


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad field and why, for a log line or a 400 body."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
