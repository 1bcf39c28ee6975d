"""Every upcfan error in one place; each carries a stable `code` and a specific human message."""

from __future__ import annotations


class UpcfanError(Exception):
    """Base error: `code` is stable for machines, `message` tells a human what happened and why."""

    code = "error"
    http_status = 500

    def __init__(self, message: str, *, code: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.details = details or {}

    def to_dict(self) -> dict:
        out = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out


class BadRequestError(UpcfanError):
    code = "bad_request"
    http_status = 400


class ForbiddenError(UpcfanError):
    """The request names something this deployment must not touch (e.g. a bucket it does not serve)."""

    code = "forbidden"
    http_status = 403


class NotFoundError(UpcfanError):
    code = "not_found"
    http_status = 404


class ConflictError(UpcfanError):
    code = "conflict"
    http_status = 409


class SourceObjectNotFoundError(NotFoundError):
    """The gs:// object named by a request or event does not exist (or not at that generation)."""

    code = "object_not_found"


class UnreadableFileError(UpcfanError):
    """The file is not a UPC text file (binary, compressed, UTF-16, invalid UTF-8, too many lines)."""

    code = "unreadable_file"
    http_status = 422


class ItemError(UpcfanError):
    """A failure of one item's side effect; `retryable` decides between backoff and `failed`."""

    code = "item_error"

    def __init__(self, message: str, *, code: str, retryable: bool, details: dict | None = None):
        super().__init__(message, code=code, details=details)
        self.retryable = retryable

    def to_dict(self) -> dict:
        return {**super().to_dict(), "retryable": self.retryable}


class RetryableItemError(ItemError):
    def __init__(self, message: str, *, code: str, details: dict | None = None):
        super().__init__(message, code=code, retryable=True, details=details)


class PermanentItemError(ItemError):
    def __init__(self, message: str, *, code: str, details: dict | None = None):
        super().__init__(message, code=code, retryable=False, details=details)


class LeaseLostError(UpcfanError):
    """This delivery no longer owns the item's lease; it must not complete the item. The worker
    answers 409 so the task stays: the lease's new holder may still re-queue the item."""

    code = "lease_lost"
    http_status = 409


class StoreUnavailableError(UpcfanError):
    """Firestore itself could not be reached (network, emulator down, deadline): nothing was decided."""

    code = "store_unavailable"
    http_status = 500
