"""Domain errors. Services raise them; one exception handler maps them to HTTP problems.

Every error carries a stable ``code`` (``source:subject:problem``) that clients and
the audit trail can rely on: never rename or reuse one.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """A refusal the caller can understand and act upon."""

    code: str = "relais:request:invalid"
    title: str = "Invalid request"
    http_status: int = 400

    def __init__(self, detail: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.extra = extra


class NotFound(DomainError):
    """Missing, or not yours: the same answer for both."""

    code = "relais:object:not-found"
    title = "Not found"
    http_status = 404


class PermissionDenied(DomainError):
    code = "relais:access:denied"
    title = "Forbidden"
    http_status = 403


class Conflict(DomainError):
    code = "relais:object:conflict"
    title = "Conflict"
    http_status = 409


class InvalidInput(DomainError):
    code = "relais:request:invalid"
    title = "Invalid input"
    http_status = 400


class UnprocessableManifest(DomainError):
    """A DICOM object that cannot be registered as a manifest."""

    code = "registry:manifest:invalid"
    title = "Manifest refused"
    http_status = 422
