""""Process this file": the one request the API, the ingest HTTP trigger and the CLI validate and submit."""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from shared.gcs import GCS_PATH_PATTERN, parse_gcs_path
from shared.handlers.choice import HandlerChoice
from shared.handlers.registry import check_handler_name, known_handler_names

# GCS generations are positive int64s; anything else cannot name one.
_MAX_GENERATION = 2**63 - 1


def _valid_gcs_path(path: str) -> str:
    parse_gcs_path(path)  # raises BadRequestError `bad_gcs_path`, which pydantic lets through unchanged
    return path


def _known_handler(name: str | None) -> str | None:
    return None if name is None else check_handler_name(name)  # else BadRequestError `unknown_handler`


def _handler_schema(schema: dict[str, Any]) -> None:
    # The names registered when the schema is generated (an enum, not a free string).
    schema["anyOf"] = [{"type": "string", "enum": known_handler_names()}, {"type": "null"}]


def _deprecated(instead: str) -> dict[str, Any]:
    # In the schema only: pydantic's own `deprecated=` would warn on every read of the field.
    return {"deprecated": True, "description": f"deprecated, use handler: {instead}"}


class ProcessFileRequest(BaseModel):
    """Start (or find) the job for one gs:// object generation, run by the named handler."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    gcs_path: Annotated[str, AfterValidator(_valid_gcs_path)] = Field(
        json_schema_extra={"pattern": GCS_PATH_PATTERN}, description="gs://bucket/object")
    handler: Annotated[Optional[str], AfterValidator(_known_handler)] = Field(
        default=None, json_schema_extra=_handler_schema,
        description="the handler the job's items run (default: the object's upcfan-handler metadata, "
                    "then the configured default)")
    create_drafts: Optional[bool] = Field(default=None, json_schema_extra=_deprecated("marketplace_draft"))
    test_mode: Optional[bool] = Field(default=None, json_schema_extra=_deprecated("dry_run (test_mode wins)"))
    generation: Optional[int] = Field(default=None, ge=1, le=_MAX_GENERATION,
                                      description="the object generation (default: the live one)")
    # ge, not gt: OpenAPI 3.0's exclusiveMinimum is a boolean, and 0 means "pause on the first failure".
    max_failed_percent: Optional[float] = Field(
        default=None, ge=0, le=100,
        description="pause the job (circuit breaker) once more than this percent of its items failed "
                    "(0: at the first failure)")

    @property
    def job_options(self) -> dict:
        """Options the job keeps beside its handler (only those the request sets)."""
        return {} if self.max_failed_percent is None else {"max_failed_percent": self.max_failed_percent}

    @property
    def handler_choice(self) -> HandlerChoice:
        """The request's level of the handler choice (over object metadata and the configured default)."""
        return HandlerChoice(handler=self.handler, test_mode=self.test_mode, create_drafts=self.create_drafts)
