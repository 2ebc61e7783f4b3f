"""RFC 9457 problem details for every error the API returns.

Domain errors (``broker.errors.DomainError``) carry their HTTP status and a stable
code; DRF's own errors (validation, authentication, parsing) are mapped here too.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import set_rollback

from broker.errors import DomainError

logger = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
_RESERVED = frozenset({"type", "title", "status", "detail", "code", "instance"})
TYPE_BASE = "https://relais.example/problems/"

_DRF_CODES: dict[type[exceptions.APIException], str] = {
    exceptions.ValidationError: "relais:request:invalid",
    exceptions.ParseError: "relais:request:malformed",
    exceptions.AuthenticationFailed: "relais:auth:failed",
    exceptions.NotAuthenticated: "relais:auth:required",
    exceptions.PermissionDenied: "relais:access:denied",
    exceptions.NotFound: "relais:object:not-found",
    exceptions.MethodNotAllowed: "relais:request:method-not-allowed",
    exceptions.NotAcceptable: "relais:request:not-acceptable",
    exceptions.UnsupportedMediaType: "relais:request:unsupported-media-type",
    exceptions.Throttled: "relais:request:throttled",
}


def problem_response(
    *, status_code: int, title: str, detail: str, code: str, instance: str = "", **extra: Any
) -> Response:
    body: dict[str, Any] = {
        "type": TYPE_BASE + code.replace(":", "/"),
        "title": title,
        "status": status_code,
        "detail": detail,
        "code": code,
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    return Response(body, status=status_code, content_type=PROBLEM_CONTENT_TYPE)


def problem_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    request = context.get("request")
    instance = request.path if request is not None else ""
    if isinstance(exc, DomainError):
        set_rollback()
        return problem_response(
            status_code=exc.http_status,
            title=exc.title,
            detail=exc.detail,
            code=exc.code,
            instance=instance,
            **{k: v for k, v in exc.extra.items() if k not in _RESERVED},
        )
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    if not isinstance(exc, exceptions.APIException):
        # Anything unexpected: logged with its traceback, answered as a problem too.
        logger.exception("Unhandled error on %s", instance)
        set_rollback()
        return problem_response(
            status_code=500,
            title="Internal Server Error",
            detail="The broker could not complete this request; it has been logged.",
            code="relais:server:error",
            instance=instance,
        )
    set_rollback()
    code = next(
        (value for cls, value in _DRF_CODES.items() if isinstance(exc, cls)), "relais:request:error"
    )
    extra: dict[str, Any] = {}
    if isinstance(exc, exceptions.ValidationError):
        detail = "The request has invalid fields"
        extra["errors"] = exc.detail
    else:
        detail = str(exc.detail)
    response = problem_response(
        status_code=exc.status_code,
        title=_title(exc.status_code),
        detail=detail,
        code=code,
        instance=instance,
        **extra,
    )
    if isinstance(exc, (exceptions.AuthenticationFailed, exceptions.NotAuthenticated)):
        authenticate_header = context["view"].get_authenticate_header(request)
        if authenticate_header:
            response["WWW-Authenticate"] = authenticate_header
    if isinstance(exc, exceptions.Throttled) and exc.wait is not None:
        response["Retry-After"] = str(int(exc.wait))
    return response


def _title(status_code: int) -> str:
    try:
        return HTTPStatus(status_code).phrase
    except ValueError:  # pragma: no cover
        return "Error"
