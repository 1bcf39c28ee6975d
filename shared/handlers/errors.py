"""Classify marketplace answers and transport faults into retryable or permanent item errors."""

from __future__ import annotations

from typing import Any

import requests

from shared.exceptions import ItemError, PermanentItemError, RetryableItemError

# Status → (code, retryable) for answers that are not 2xx; 404 depends on the step (see below).
_STATUS_CODES: dict[int, tuple[str, bool]] = {
    400: ("marketplace_rejected", False),
    401: ("marketplace_unauthorized", False),
    403: ("marketplace_unauthorized", False),
    404: ("marketplace_not_found", False),
    409: ("marketplace_conflict", False),
    422: ("marketplace_rejected", False),
    429: ("marketplace_rate_limited", True),
}

_WHY = {
    "marketplace_rejected": "the marketplace rejected the request",
    "marketplace_unauthorized": "the marketplace refused our credentials",
    "marketplace_not_found": "the marketplace does not know this resource",
    "product_not_found": "the marketplace catalog has no product for this GTIN",
    "marketplace_conflict": "the marketplace reports a conflicting resource",
    "marketplace_rate_limited": "the marketplace is rate limiting us",
    "marketplace_unavailable": "the marketplace had a server error",
}


def marketplace_error_text(response: requests.Response) -> tuple[str, str | None]:
    """The marketplace's own message and errorId from an eBay-style `{"errors": [...]}` body."""
    try:
        body = response.json()
    except ValueError:
        text = (response.text or "").strip().replace("\n", " ")
        return (text[:200] or "no error body"), None
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        first = errors[0]
        message = str(first.get("message") or first.get("longMessage") or "no message")
        if len(errors) > 1:
            message += f" (+{len(errors) - 1} more)"
        error_id = first.get("errorId")
        return message, (str(error_id) if error_id is not None else None)
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"]), None
    return "no error message in body", None


def classify_response(step: str, method: str, path: str, response: requests.Response, *,
                      credential: str | None = None) -> ItemError:
    """An `ItemError` for a non-2xx answer: what failed, where (step, method, path, status), why.
    `credential` says which credential a 401/403 refused (named, never its value)."""
    status = response.status_code
    if status in _STATUS_CODES:
        code, retryable = _STATUS_CODES[status]
    elif status >= 500:
        code, retryable = "marketplace_unavailable", True
    else:
        code, retryable = "marketplace_rejected", False
    if status == 404 and step == "catalog lookup":
        code = "product_not_found"
    their_message, error_id = marketplace_error_text(response)
    where = f"{step}: {method} {path} answered {status}"
    if error_id:
        where += f" (errorId {error_id})"
    why = credential if code == "marketplace_unauthorized" and credential else _WHY.get(code, "unexpected answer")
    message = f"{where}: {their_message}; {why}"
    details: dict[str, Any] = {"step": step, "status": status}
    if error_id:
        details["error_id"] = error_id
    if status == 429 or status >= 500:
        # A 503 may carry Retry-After as well as a 429 (RFC 9110, section 10.2.3): the in-attempt
        # retry waits at least that long (`shared/retry.py` OUTBOUND_HTTP).
        retry_after = response.headers.get("Retry-After")
        if retry_after:
            message += f", retry after {retry_after} s" if retry_after.strip().isdigit() else f", retry after {retry_after}"
            details["retry_after"] = retry_after
    cls = RetryableItemError if retryable else PermanentItemError
    return cls(message, code=code, details=details)


def classify_exception(step: str, method: str, path: str, exc: Exception) -> ItemError:
    """An `ItemError` for a transport fault (timeout, refused connection, broken answer)."""
    details = {"step": step, "exception": type(exc).__name__}
    if isinstance(exc, requests.Timeout):
        kind = "connect" if isinstance(exc, requests.ConnectTimeout) else "read"
        return RetryableItemError(
            f"{step}: {method} {path} timed out ({kind} timeout): the marketplace did not answer in time",
            code="marketplace_timeout",
            details=details,
        )
    if isinstance(exc, requests.ConnectionError):
        return RetryableItemError(
            f"{step}: {method} {path} could not connect: {_short(exc)}",
            code="marketplace_unavailable",
            details=details,
        )
    if isinstance(exc, requests.RequestException):
        return RetryableItemError(
            f"{step}: {method} {path} failed in transport: {type(exc).__name__}: {_short(exc)}",
            code="marketplace_unavailable",
            details=details,
        )
    return RetryableItemError(
        f"{step}: {method} {path} raised {type(exc).__name__}: {_short(exc)}",
        code="handler_crashed",
        details=details,
    )


def _short(exc: Exception, n: int = 200) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= n else text[:n] + "…"
