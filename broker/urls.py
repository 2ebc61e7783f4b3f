"""URL map of the broker: portal, REST API (``/api/v1/``), OpenAPI schema, admin."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView

from broker import apis, views
from consent import apis as consent_apis
from sharing import apis as sharing_apis
from sharing import dicomweb
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
    # Sharing: tickets, the inbox, break-the-glass, tokens, duty shifts.
    path("requests", sharing_apis.RequestCollectionApi.as_view(), name="requests"),
    path("requests/<uuid:ticket_id>", sharing_apis.RequestDetailApi.as_view(), name="request"),
    *(
        path(f"requests/<uuid:ticket_id>/{action}", view.as_view(), name=f"request-{action}")
        for action, view in (
            ("approve", sharing_apis.RequestApproveApi),
            ("deny", sharing_apis.RequestDenyApi),
            ("cancel", sharing_apis.RequestCancelApi),
            ("revoke", sharing_apis.RequestRevokeApi),
            ("answer", sharing_apis.AvisAnswerApi),
            ("story", sharing_apis.TicketStoryApi),
            ("tokens", sharing_apis.TokenIssueApi),
        )
    ),
    path("inbox", sharing_apis.InboxApi.as_view(), name="inbox"),
    path("emergency", sharing_apis.EmergencyApi.as_view(), name="emergency"),
    path(
        "emergency/reviews",
        sharing_apis.EmergencyReviewCollectionApi.as_view(),
        name="emergency-reviews",
    ),
    path(
        "emergency/reviews/<int:review_id>",
        sharing_apis.EmergencyReviewApi.as_view(),
        name="emergency-review",
    ),
    path("tokens/introspect", sharing_apis.TokenIntrospectApi.as_view(), name="token-introspect"),
    path("tokens/revoke", sharing_apis.TokenRevokeApi.as_view(), name="token-revoke"),
    path(
        "orthanc/tokens/validate",
        sharing_apis.OrthancTokenValidateApi.as_view(),
        name="orthanc-token-validate",
    ),
    path("duty-shifts", sharing_apis.ShiftCollectionApi.as_view(), name="duty-shifts"),
    path(
        "duty-shifts/<uuid:shift_id>/cancel",
        sharing_apis.ShiftCancelApi.as_view(),
        name="duty-shift-cancel",
    ),
]

UID = r"[0-9.]{1,64}"
dicomweb_urls = [
    re_path(r"^studies$", dicomweb.studies_query, name="studies"),
    re_path(rf"^studies/(?P<study>{UID})$", dicomweb.study_view, name="study"),
    re_path(rf"^studies/(?P<study>{UID})/series$", dicomweb.series_query, name="series-query"),
    re_path(
        rf"^studies/(?P<study>{UID})/series/(?P<series>{UID})$",
        dicomweb.series_view,
        name="series",
    ),
    re_path(
        rf"^studies/(?P<study>{UID})/series/(?P<series>{UID})/instances$",
        dicomweb.instances_query,
        name="instances-query",
    ),
    re_path(
        rf"^studies/(?P<study>{UID})/series/(?P<series>{UID})/instances/(?P<instance>{UID})$",
        dicomweb.instance_view,
        name="instance",
    ),
    re_path(rf"^studies/(?P<study>{UID})/metadata$", dicomweb.study_metadata, name="metadata"),
    re_path(
        rf"^studies/(?P<study>{UID})/series/(?P<series>{UID})/metadata$",
        dicomweb.series_metadata,
        name="series-metadata",
    ),
    re_path(
        rf"^studies/(?P<study>{UID})/series/(?P<series>{UID})/instances/(?P<instance>{UID})"
        r"/metadata$",
        dicomweb.instance_metadata,
        name="instance-metadata",
    ),
    re_path(
        rf"^studies/(?P<study>{UID})/series/(?P<series>{UID})/instances/(?P<instance>{UID})"
        r"/(?P<resource>frames/[0-9]{1,6}(?:,[0-9]{1,6}){0,99}|rendered|thumbnail)$",
        dicomweb.instance_resource,
        name="instance-resource",
    ),
]

urlpatterns = [
    path("", views.home, name="home"),
    path("dicomweb/", include((dicomweb_urls, "dicomweb"), namespace="dicomweb")),
    path("healthz", views.healthz, name="healthz"),
    path(".well-known/jwks.json", sharing_views.jwks_view, name="jwks"),
    path("api/v1/", include((api_v1, "api"), namespace="v1")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularRedocView.as_view(url_name="schema"), name="api-docs"),
    path("api-auth/", include("rest_framework.urls")),
    path("admin/", admin.site.urls),
]

handler404 = "broker.views.not_found"
