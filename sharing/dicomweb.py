"""``/dicomweb/``: the retrieval gateway's DICOMweb face (QIDO-RS from the registry, WADO-RS
streamed from the source archive), for a viewer or a PACS holding a retrieval token.

Plain Django views (a streamed body, no serializer): each checks the token
(`sharing.gateway.gateway_access`), finds what it may reach, and answers. QIDO-RS also
answers a signed-in user without a token, within the tokens they hold
(`sharing.gateway.gateway_session_accesses`); a retrieval always needs the token. Errors are
RFC 9457 problems: 401 without a valid token (with ``WWW-Authenticate: Bearer``), the same 404 for a
study, series or instance outside the token's scope as for a missing one, 502/503/504 with
``Retry-After`` when the source archive fails.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET

from audit.types import Actor
from broker.access import client_address
from broker.dicom.archive import (
    ArchiveError,
    ArchiveNotFound,
    ArchiveTimeout,
    ArchiveUnreachable,
)
from broker.errors import NotFound
from broker.models import Manifest
from sharing.gateway import (
    MULTIPART_DICOM,
    GatewayAccess,
    GatewayRefused,
    GatewayUnsupported,
    gateway_access,
    gateway_audit_query,
    gateway_audit_query_empty,
    gateway_instance_resource,
    gateway_instances,
    gateway_manifest,
    gateway_metadata,
    gateway_refuse_query,
    gateway_refuse_scope,
    gateway_retrieve,
    gateway_session_accesses,
    gateway_session_actor,
)
from sharing.zero_copy import bound_client_sends, chunk_writer

DICOM_JSON = "application/dicom+json"
TYPE_BASE = "https://relais.example/problems/"


def _problem(status: int, title: str, detail: str, code: str, **headers: str) -> HttpResponse:
    body = {
        "type": TYPE_BASE + code.replace(":", "/"),
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    response = HttpResponse(
        json.dumps(body), status=status, content_type="application/problem+json"
    )
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def _guarded(
    view: Callable[[HttpRequest, GatewayAccess], HttpResponse],
) -> Callable[..., HttpResponse]:
    """The token checked first; domain and archive errors as problems."""

    @require_GET
    def wrapper(request: HttpRequest, **kwargs: str) -> HttpResponse:
        now = timezone.now()
        try:
            access = gateway_access(
                authorization=request.headers.get("Authorization", ""),
                address=client_address(request),
                now=now,
            )
        except GatewayRefused as refused:
            return _problem(
                401,
                "Unauthorized",
                refused.detail,
                refused.code,
                WWW_Authenticate='Bearer realm="relais", error="invalid_token"',
            )
        try:
            return view(request, access, **kwargs)  # type: ignore[call-arg]
        except NotFound as missing:
            gateway_refuse_scope(access, request.path, now)
            return _problem(404, "Not found", missing.detail, missing.code)
        except ArchiveError as failure:
            return _archive_problem(failure)

    return wrapper


@dataclass(frozen=True)
class QueryScope:
    """Who asks a QIDO-RS query, and through what: one token's access, or the tokens a
    signed-in user holds (none, for someone who holds none)."""

    actor: Actor
    accesses: list[GatewayAccess]
    by_token: bool = False


# Browsers say where a request comes from (Fetch Metadata); a session answers only a page of
# the broker's own, or an address typed in: another site's link or form would otherwise write
# audited queries under the user's name (the session cookie is SameSite=Lax).
_SESSION_FETCH_SITES = frozenset({"same-origin", "none"})


def _query_guarded(
    view: Callable[[HttpRequest, QueryScope], HttpResponse],
) -> Callable[..., HttpResponse]:
    """QIDO-RS: a token, as for a retrieval; or, without one, the signed-in user's session,
    answered within the tokens they hold (`gateway_session_accesses`)."""
    token_view = _guarded(
        lambda request, access, **kwargs: view(
            request, QueryScope(access.actor, [access], by_token=True), **kwargs
        )
    )

    @require_GET
    def wrapper(request: HttpRequest, **kwargs: str) -> HttpResponse:
        user = getattr(request, "user", None)
        if (
            "Authorization" in request.headers
            or user is None
            or not user.is_authenticated
            or request.headers.get("Sec-Fetch-Site", "same-origin") not in _SESSION_FETCH_SITES
        ):
            return token_view(request, **kwargs)
        now = timezone.now()
        address = client_address(request)
        scope = QueryScope(
            gateway_session_actor(user, address),
            gateway_session_accesses(user=user, address=address, now=now),
        )
        try:
            return view(request, scope, **kwargs)  # type: ignore[call-arg]
        except NotFound as missing:
            # The study one of their tokens covers (a series it does not list): refused
            # for its patient, as through the token; otherwise for nobody's.
            study = kwargs.get("study", "")
            covering = [a for a in scope.accesses if study in a.claims.studies]
            if covering:
                gateway_refuse_scope(covering[0], request.path, now)
            else:
                gateway_refuse_query(scope.actor, request.path, now)
            return _problem(404, "Not found", missing.detail, missing.code)

    return wrapper


def _covering(accesses: list[GatewayAccess], study: str) -> tuple[GatewayAccess, Manifest]:
    """The first access that reaches ``study``, with its manifest; the same 404 otherwise."""
    for access in accesses:
        try:
            return access, gateway_manifest(access, study)
        except NotFound:
            continue
    raise NotFound("No such study", code="gateway:study:not-found")


def _archive_problem(failure: ArchiveError) -> HttpResponse:
    if isinstance(failure, ArchiveNotFound):
        return _problem(
            404, "Not found", "the source archive does not hold it", "gateway:archive:not-found"
        )
    if isinstance(failure, ArchiveTimeout):
        return _problem(
            504,
            "Gateway Timeout",
            f"the source archive did not answer in time: {failure}",
            "gateway:archive:timeout",
            Retry_After="30",
        )
    if isinstance(failure, ArchiveUnreachable):
        return _problem(
            503,
            "Service Unavailable",
            f"the source archive cannot be reached: {failure}",
            "gateway:archive:unreachable",
            Retry_After="60",
        )
    return _problem(
        502,
        "Bad Gateway",
        f"the source archive answered an error: {failure}",
        "gateway:archive:error",
        Retry_After="60",
    )


def _accepts_multipart_dicom(request: HttpRequest) -> bool:
    accept = request.headers.get("Accept", "*/*")
    return any(
        kind.strip().startswith(("multipart/related", "*/*", "multipart/*"))
        for kind in accept.split(",")
    )


def _retrieve(
    request: HttpRequest,
    access: GatewayAccess,
    study: str,
    series: str | None = None,
    instance: str | None = None,
) -> HttpResponse:
    if not _accepts_multipart_dicom(request):
        return _problem(
            406,
            "Not Acceptable",
            f"this resource is served as {MULTIPART_DICOM}",
            "gateway:request:not-acceptable",
        )
    now = timezone.now()
    manifest = gateway_manifest(access, study)
    allowed = gateway_instances(manifest, series, instance)
    bound_client_sends(request.META)
    writer = chunk_writer(request.META)
    content_type, body = gateway_retrieve(
        access,
        manifest,
        series_uid=series,
        sop_uid=instance,
        allowed=allowed,
        now=now,
        writer=writer,
    )
    response = StreamingHttpResponse(body, content_type=content_type)
    response["Cache-Control"] = "no-store"
    return response


@_guarded
def study_view(request: HttpRequest, access: GatewayAccess, study: str) -> HttpResponse:
    return _retrieve(request, access, study)


@_guarded
def series_view(
    request: HttpRequest, access: GatewayAccess, study: str, series: str
) -> HttpResponse:
    return _retrieve(request, access, study, series)


@_guarded
def instance_view(
    request: HttpRequest, access: GatewayAccess, study: str, series: str, instance: str
) -> HttpResponse:
    return _retrieve(request, access, study, series, instance)


def _metadata(
    request: HttpRequest,
    access: GatewayAccess,
    study: str,
    series: str | None = None,
    instance: str | None = None,
) -> HttpResponse:
    manifest = gateway_manifest(access, study)
    allowed = gateway_instances(manifest, series, instance)
    items = gateway_metadata(
        access, manifest, series_uid=series, sop_uid=instance, allowed=allowed, now=timezone.now()
    )
    return _json(items)


@_guarded
def study_metadata(request: HttpRequest, access: GatewayAccess, study: str) -> HttpResponse:
    return _metadata(request, access, study)


@_guarded
def series_metadata(
    request: HttpRequest, access: GatewayAccess, study: str, series: str
) -> HttpResponse:
    return _metadata(request, access, study, series)


@_guarded
def instance_metadata(
    request: HttpRequest, access: GatewayAccess, study: str, series: str, instance: str
) -> HttpResponse:
    return _metadata(request, access, study, series, instance)


@_guarded
def instance_resource(
    request: HttpRequest,
    access: GatewayAccess,
    study: str,
    series: str,
    instance: str,
    resource: str,
) -> HttpResponse:
    """``frames/<n,...>``, ``rendered``, ``thumbnail`` of an instance the manifest lists."""
    manifest = gateway_manifest(access, study)
    gateway_instances(manifest, series, instance)
    try:
        content_type, body = gateway_instance_resource(
            access,
            manifest,
            series_uid=series,
            sop_uid=instance,
            resource=resource,
            accept=request.headers.get("Accept", "*/*"),
            now=timezone.now(),
        )
    except GatewayUnsupported as unsupported:
        return _problem(501, "Not Implemented", str(unsupported), "gateway:resource:unsupported")
    bound_client_sends(request.META)
    response = StreamingHttpResponse(body, content_type=content_type)
    response["Cache-Control"] = "no-store"
    return response


# --------------------------------------------------------------------------- QIDO-RS


def _json(items: list[dict[str, Any]]) -> HttpResponse:
    response = HttpResponse(json.dumps(items), content_type=DICOM_JSON)
    response["Cache-Control"] = "no-store"
    return response


def _attr(vr: str, *values: Any) -> dict[str, Any]:
    present = [v for v in values if v not in (None, "")]
    return {"vr": vr, "Value": present} if present else {"vr": vr}


def _study_json(manifest: Manifest, base: str) -> dict[str, Any]:
    identifier = manifest.source_identifier
    name = "^".join(filter(None, (identifier.family_name, identifier.given_names)))
    return {
        "0020000D": _attr("UI", manifest.study_instance_uid),
        "00080020": _attr(
            "DA", manifest.study_date.strftime("%Y%m%d") if manifest.study_date else ""
        ),
        "00080030": _attr(
            "TM", manifest.study_time.strftime("%H%M%S") if manifest.study_time else ""
        ),
        "00080050": _attr("SH", manifest.accession_number),
        "00081030": _attr("LO", manifest.study_description),
        "00080061": _attr("CS", *manifest.modalities),
        "00100010": _attr("PN", {"Alphabetic": name} if name else None),
        "00100020": _attr("LO", identifier.value),
        "00100021": _attr("LO", identifier.issuer),
        "00201206": _attr("IS", manifest.series_count),
        "00201208": _attr("IS", manifest.instance_count),
        "00081190": _attr("UR", f"{base}/studies/{manifest.study_instance_uid}"),
    }


def _base(request: HttpRequest) -> str:
    return request.build_absolute_uri("/dicomweb").rstrip("/")


@_query_guarded
def studies_query(request: HttpRequest, scope: QueryScope) -> HttpResponse:
    """The studies of the token, or of the signed-in user's tokens (``StudyInstanceUID`` may
    narrow them). Through a session: audited for each token that showed something (under
    its ticket's patient); a query that showed nothing, once, for nobody's."""
    wanted = request.GET.get("StudyInstanceUID") or request.GET.get("0020000D")
    results = []
    listed: set[str] = set()
    now = timezone.now()
    for access in scope.accesses:
        found = 0
        for uid in access.claims.studies:
            if uid in listed or (wanted and uid not in wanted.split(",")):
                continue
            try:
                manifest = gateway_manifest(access, uid)
            except NotFound:
                continue
            listed.add(uid)
            found += 1
            results.append(_study_json(manifest, _base(request)))
        if found or scope.by_token:
            gateway_audit_query(access, request.get_full_path(), found, now)
    if not results and not scope.by_token:
        gateway_audit_query_empty(scope.actor, request.get_full_path(), now)
    return _json(results)


@_query_guarded
def series_query(request: HttpRequest, scope: QueryScope, study: str) -> HttpResponse:
    access, manifest = _covering(scope.accesses, study)
    base = _base(request)
    results = [
        {
            "0020000D": _attr("UI", study),
            "0020000E": _attr("UI", series.series_instance_uid),
            "00080060": _attr("CS", series.modality),
            "00180015": _attr("CS", series.body_part),
            "00201209": _attr("IS", series.instance_count),
            "00081190": _attr("UR", f"{base}/studies/{study}/series/{series.series_instance_uid}"),
        }
        for series in manifest.series.order_by("id")
    ]
    gateway_audit_query(access, request.get_full_path(), len(results), timezone.now())
    return _json(results)


@_query_guarded
def instances_query(
    request: HttpRequest, scope: QueryScope, study: str, series: str
) -> HttpResponse:
    access, manifest = _covering(scope.accesses, study)
    gateway_instances(manifest, series)  # 404 for a series the manifest does not list
    base = _base(request)
    rows = manifest.series.get(series_instance_uid=series).instances.order_by("id")
    results = [
        {
            "0020000D": _attr("UI", study),
            "0020000E": _attr("UI", series),
            "00080016": _attr("UI", row.sop_class_uid),
            "00080018": _attr("UI", row.sop_instance_uid),
            "00081190": _attr(
                "UR",
                f"{base}/studies/{study}/series/{series}/instances/{row.sop_instance_uid}",
            ),
        }
        for row in rows
    ]
    gateway_audit_query(access, request.get_full_path(), len(results), timezone.now())
    return _json(results)
