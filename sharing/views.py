"""Public endpoints of sharing: the token verification keys."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from sharing.keystore import verification_keys
from sharing.tokens import jwks


@require_GET
def jwks_view(request: HttpRequest) -> JsonResponse:
    """``/.well-known/jwks.json``: the public keys that verify retrieval tokens (RFC 7517)."""
    response = JsonResponse(jwks(verification_keys()))
    response["Cache-Control"] = "public, max-age=60"
    return response
