"""Which google.rpc status a Google API error carries, whichever transport raised it.

The gRPC transport (production) raises one class per status: `AlreadyExists`, `Aborted`,
`InvalidArgument`, `FailedPrecondition`. The REST transport maps by HTTP status only: a 409 is
`Conflict` for ALREADY_EXISTS and ABORTED alike, a 400 is `BadRequest` for INVALID_ARGUMENT,
FAILED_PRECONDITION and OUT_OF_RANGE; the status name is only in the JSON body. Code that decides
on a status asks here, so both transports take the same path.
"""

from __future__ import annotations

from google.api_core import exceptions as gexc


def rpc_status(exc: BaseException) -> str:
    """The google.rpc status name ("ALREADY_EXISTS", "ABORTED", ...) of an API error; "" when it is
    not one or carries none (a REST error whose body is not Google's JSON error)."""
    code = getattr(exc, "grpc_status_code", None)  # set on every class that maps to one status
    if code is not None:
        return code.name
    response = getattr(exc, "response", None)
    if isinstance(exc, gexc.GoogleAPICallError) and response is not None:
        try:
            status = response.json()["error"]["status"]
        except (ValueError, TypeError, KeyError, AttributeError):
            return ""
        return status if isinstance(status, str) else ""
    return ""


def is_already_exists(exc: BaseException) -> bool:
    """ALREADY_EXISTS: gRPC `AlreadyExists`, or a REST 409 `Conflict` whose body says so."""
    return rpc_status(exc) == "ALREADY_EXISTS"


def is_aborted(exc: BaseException) -> bool:
    """ABORTED (concurrency conflict, retry the call): gRPC `Aborted`, or a REST 409 that says so."""
    return rpc_status(exc) == "ABORTED"
