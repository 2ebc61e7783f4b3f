"""OpenAPI (drf-spectacular) descriptions of what the framework cannot guess."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class InstitutionApiKeyScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    target_class = "broker.api.authentication.InstitutionApiKeyAuthentication"
    name = "InstitutionApiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "An institution system's key: `Authorization: Api-Key <key>` "
            "(made by `manage.py create_api_key`).",
        }


class InstitutionBasicScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    target_class = "broker.api.authentication.InstitutionBasicAuthentication"
    name = "InstitutionBasic"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "basic",
            "description": "An institution system's FINESS as user name, its API key as "
            "password (for Orthanc's authorization plugin).",
        }
