"""``Authorization: Api-Key <key>``: an institution's system calling the API.

Keys are made by ``manage.py create_api_key`` (shown once, stored hashed by
djangorestframework-api-key). A bad key is refused with 401 and audited.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from django.db import transaction
from django.utils import timezone
from rest_framework import authentication, exceptions
from rest_framework.request import Request
from rest_framework_api_key.permissions import KeyParser

from audit.events import EventCode, Outcome
from audit.services import Actor, audit_record
from broker.access import InstitutionSystem, client_address
from broker.models import InstitutionAPIKey


class InstitutionApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = KeyParser.keyword

    def authenticate(self, request: Request) -> tuple[InstitutionSystem, InstitutionAPIKey] | None:
        key = KeyParser().get_from_authorization(request)
        if key is None:
            return None
        api_key = self._valid_key(key)
        if api_key is None:
            self._audit_refusal(request, key)
            raise exceptions.AuthenticationFailed("Unknown, revoked or expired API key")
        return InstitutionSystem(
            institution=api_key.institution, key_prefix=api_key.prefix
        ), api_key

    def authenticate_header(self, request: Request) -> str:
        return self.keyword

    @staticmethod
    def _valid_key(key: str) -> InstitutionAPIKey | None:
        try:
            api_key: Any = InstitutionAPIKey.objects.get_from_key(key)
        except InstitutionAPIKey.DoesNotExist:
            return None
        if api_key.has_expired or not api_key.institution.active:
            return None
        return api_key  # type: ignore[no-any-return]

    @staticmethod
    def _audit_refusal(request: Request, key: str) -> None:
        prefix = key.partition(".")[0][:8]
        with transaction.atomic():
            audit_record(
                code=EventCode.API_KEY_REFUSED,
                actor=Actor.anonymous(client_address(request)),
                now=timezone.now(),
                outcome=Outcome.MINOR_FAILURE,
                objects=[{"type": "api-key", "prefix": prefix}],
                details={"path": request.path, "method": request.method},
            )


API_KEY_SHAPE = re.compile(r"^[A-Za-z0-9]{8}\.[A-Za-z0-9]+$")


class InstitutionBasicAuthentication(InstitutionApiKeyAuthentication):
    """``Authorization: Basic`` with the institution's FINESS as user name and its API key as
    password: for peers that only speak Basic (Orthanc's authorization plugin)."""

    def authenticate(self, request: Request) -> tuple[InstitutionSystem, InstitutionAPIKey] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic" or not encoded:
            return None
        try:
            finess, _, key = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, ValueError):  # not base64, not ASCII, not UTF-8
            raise exceptions.AuthenticationFailed("Malformed Basic credentials") from None
        api_key = self._valid_key(key) if key else None
        if api_key is None or api_key.institution.finess != finess:
            # The key's public prefix is kept, never what could be someone's password.
            self._audit_refusal(request, key if API_KEY_SHAPE.match(key) else "")
            raise exceptions.AuthenticationFailed("Unknown, revoked or expired API key")
        return InstitutionSystem(
            institution=api_key.institution, key_prefix=api_key.prefix
        ), api_key

    def authenticate_header(self, request: Request) -> str:
        return 'Basic realm="relais"'
