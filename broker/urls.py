"""URL map of the broker: portal, REST API (``/api/v1/``), OpenAPI schema, admin."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView

from broker import apis, views
from consent import apis as consent_apis
from sharing import views as sharing_views

api_v1 = [
    path("manifests", apis.ManifestCollectionApi.as_view(), name="manifests"),
    path("manifests/<str:sop_instance_uid>", apis.ManifestDetailApi.as_view(), name="manifest"),
    path(
        "manifests/<str:sop_instance_uid>/kos",
        apis.ManifestDocumentApi.as_view(),
        name="manifest-document",
    ),
    path(
        "manifests/<str:sop_instance_uid>/deprecate",
        apis.ManifestDeprecateApi.as_view(),
        name="manifest-deprecate",
    ),
    path("patients", apis.PatientLookupApi.as_view(), name="patient-lookup"),
    path("patients/<uuid:public_id>", apis.PatientDetailApi.as_view(), name="patient"),
    path(
        "patients/<uuid:public_id>/directives",
        consent_apis.DirectiveCollectionApi.as_view(),
        name="directives",
    ),
    path(
        "patients/<uuid:public_id>/directives/<int:directive_id>/withdraw",
        consent_apis.DirectiveWithdrawApi.as_view(),
        name="directive-withdraw",
    ),
    path(
        "patients/<uuid:public_id>/directives/<int:directive_id>/amend",
        consent_apis.DirectiveAmendApi.as_view(),
        name="directive-amend",
    ),
    path(
        "patients/<uuid:public_id>/consent/evaluate",
        consent_apis.ConsentEvaluateApi.as_view(),
        name="consent-evaluate",
    ),
    path(
        "patients/<uuid:public_id>/consent",
        consent_apis.ConsentExportApi.as_view(),
        name="consent-export",
    ),
    path("identity/unlink", apis.IdentifierUnlinkApi.as_view(), name="identity-unlink"),
    path("identity/candidates", apis.CandidateListApi.as_view(), name="identity-candidates"),
    path(
        "identity/candidates/<int:candidate_id>",
        apis.CandidateDecisionApi.as_view(),
        name="identity-candidate",
    ),
    path("institutions", apis.InstitutionCollectionApi.as_view(), name="institutions"),
    path("institutions/<str:finess>", apis.InstitutionDetailApi.as_view(), name="institution"),
]

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path(".well-known/jwks.json", sharing_views.jwks_view, name="jwks"),
    path("api/v1/", include((api_v1, "api"), namespace="v1")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularRedocView.as_view(url_name="schema"), name="api-docs"),
    path("api-auth/", include("rest_framework.urls")),
    path("admin/", admin.site.urls),
]

handler404 = "broker.views.not_found"
