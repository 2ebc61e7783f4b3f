"""The few server-rendered pages of the broker so far (the portal grows in sharing/)."""

from __future__ import annotations

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from broker import selectors
from broker.access import institutions_directory


def home(request: HttpRequest) -> HttpResponse:
    context = {
        "region": settings.RELAIS_REGION_NAME,
        "institutions": institutions_directory().filter(active=True),
        "manifest_count": selectors.approved_manifest_count(),
    }
    return render(request, "broker/home.html", context)


def healthz(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if request.path.startswith("/api/"):
        return JsonResponse(
            {
                "type": "https://relais.example/problems/relais/object/not-found",
                "title": "Not Found",
                "status": 404,
                "detail": f"No resource at {request.path}",
                "code": "relais:object:not-found",
            },
            status=404,
            content_type="application/problem+json",
        )
    return render(request, "broker/404.html", status=404)
