"""REST API of the registry (``/api/v1/``): thin views over services, selectors and gates."""

from __future__ import annotations

import uuid
from typing import Any

from django.db import transaction
from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import exceptions, serializers, status
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from audit.events import EventCode
from audit.services import audit_record
from broker import identity, selectors, services
from broker.access import (
    InstitutionSystem,
    access_candidate,
    access_identifier_for_identity,
    access_institution,
    access_manifest_by_uid,
    access_patient,
    actor_for,
    can_administer_institution,
    can_deprecate_manifest,
    candidates_visible_to,
    institutions_directory,
    is_region_admin,
    manifests_visible_to,
    patients_visible_to,
    require_region_admin,
)
from broker.api.parsers import DicomParser
from broker.errors import InvalidInput, NotFound, PermissionDenied
from broker.identity import patient_ref
from broker.models import Institution, LinkCandidate, Manifest, ManifestStatus, PatientIdentifier

MAX_PAGE_SIZE = 200


# ---------------------------------------------------------------------------
# Output serializers


class InstitutionOutput(serializers.ModelSerializer[Institution]):
    class Meta:
        model = Institution
        fields = ["finess", *services.INSTITUTION_FIELDS]


class ManifestSummaryOutput(serializers.Serializer[Manifest]):
    sop_instance_uid = serializers.CharField()
    study_instance_uid = serializers.CharField()
    accession_number = serializers.CharField()
    study_date = serializers.DateField(allow_null=True)
    study_time = serializers.TimeField(allow_null=True)
    study_description = serializers.CharField()
    modalities = serializers.ListField(child=serializers.CharField())
    body_parts = serializers.ListField(child=serializers.CharField())
    series_count = serializers.IntegerField()
    instance_count = serializers.IntegerField()
    source_institution = serializers.CharField(source="source_institution.finess")
    source_patient_id = serializers.SerializerMethodField()
    status = serializers.CharField()
    registered_at = serializers.DateTimeField()
    kos_sha256 = serializers.CharField()
    kos_size = serializers.IntegerField()

    def get_source_patient_id(self, manifest: Manifest) -> dict[str, str]:
        return {
            "issuer": manifest.source_identifier.issuer,
            "value": manifest.source_identifier.value,
        }


class SeriesOutput(serializers.Serializer[Any]):
    study_instance_uid = serializers.CharField()
    series_instance_uid = serializers.CharField()
    modality = serializers.CharField()
    body_part = serializers.CharField()
    retrieve_ae_title = serializers.CharField()
    retrieve_location_uid = serializers.CharField()
    retrieve_url = serializers.CharField()
    instance_count = serializers.IntegerField()


class ManifestDetailOutput(ManifestSummaryOutput):
    patient = serializers.UUIDField(source="source_identifier.patient.public_id")
    retrieve_ae_title = serializers.CharField()
    retrieve_location_uid = serializers.CharField()
    retrieve_url = serializers.CharField()
    replaced_by = serializers.CharField(source="replaced_by.sop_instance_uid", allow_null=True)
    replaces = serializers.SerializerMethodField()
    deprecated_at = serializers.DateTimeField(allow_null=True)
    series = serializers.SerializerMethodField()

    def get_replaces(self, manifest: Manifest) -> list[str]:
        return list(manifest.replaces.order_by("id").values_list("sop_instance_uid", flat=True))

    def get_series(self, manifest: Manifest) -> list[dict[str, Any]]:
        return SeriesOutput(selectors.manifest_series(manifest=manifest), many=True).data  # type: ignore[return-value]


class IdentifierOutput(serializers.ModelSerializer[PatientIdentifier]):
    institution = serializers.CharField(source="institution.finess", allow_null=True)

    class Meta:
        model = PatientIdentifier
        fields = [
            "issuer",
            "value",
            "kind",
            "institution",
            "qualified",
            "test",
            "family_name",
            "given_names",
            "birth_name",
            "birth_date",
            "sex",
        ]


PatientOutput = inline_serializer(
    "Patient",
    {"id": serializers.UUIDField(), "identifiers": IdentifierOutput(many=True)},
)


def _patient_output(patient: Any) -> dict[str, Any]:
    return {
        "id": str(patient.public_id),
        "identifiers": IdentifierOutput(
            selectors.patient_identifiers(patient=patient), many=True
        ).data,
    }


def _now() -> Any:
    return timezone.now()


# ---------------------------------------------------------------------------
# Manifests


class ManifestCollectionApi(APIView):
    """Publish a manifest (institution systems) or query the registry."""

    parser_classes = [DicomParser]

    class FilterInput(serializers.Serializer[Any]):
        issuer = serializers.CharField(required=False, max_length=64)
        patient_id = serializers.CharField(required=False, max_length=64)
        patient = serializers.UUIDField(required=False)
        date_from = serializers.DateField(required=False)
        date_to = serializers.DateField(required=False)
        modality = serializers.CharField(required=False, max_length=16)
        institution = serializers.CharField(required=False, max_length=9)
        study_instance_uid = serializers.CharField(required=False, max_length=64)
        status = serializers.ChoiceField(
            choices=[*ManifestStatus.values, "any"], required=False, default="Approved"
        )
        cursor = serializers.CharField(required=False, max_length=200)
        limit = serializers.IntegerField(
            required=False, min_value=1, max_value=MAX_PAGE_SIZE, default=50
        )

        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            if bool(attrs.get("issuer")) != bool(attrs.get("patient_id")):
                raise serializers.ValidationError("issuer and patient_id go together")
            if (
                attrs.get("date_from")
                and attrs.get("date_to")
                and attrs["date_from"] > attrs["date_to"]
            ):
                raise serializers.ValidationError("date_from is after date_to")
            return attrs

    @extend_schema(
        request={"application/dicom": OpenApiTypes.BINARY},
        responses={201: ManifestDetailOutput, 200: ManifestDetailOutput},
        summary="Publish a KOS manifest (Api-Key of the publishing institution)",
    )
    def post(self, request: Request) -> Response:
        if not isinstance(request.user, InstitutionSystem):
            raise PermissionDenied(
                "Manifests are published by an institution's system with its API key",
                code="registry:manifest:publisher-required",
            )
        try:
            data = request.data
            if not isinstance(data, bytes | bytearray):  # an empty body never reaches the parser
                raise exceptions.ParseError("The body is empty: send a DICOM file")
        except (exceptions.ParseError, exceptions.UnsupportedMediaType) as exc:
            services.manifest_rejection_audit(
                code="registry:manifest:unreadable-body",
                message=str(exc.detail),
                data=b"",
                institution=request.user.institution,
                actor=actor_for(request),
                now=_now(),
            )
            raise
        result = services.manifest_register(
            data=data,
            institution=request.user.institution,
            actor=actor_for(request),
            now=_now(),
        )
        body = ManifestDetailOutput(result.manifest).data
        body["outcome"] = result.outcome
        return Response(
            body,
            status=status.HTTP_200_OK if result.outcome == "unchanged" else status.HTTP_201_CREATED,
            headers={"Location": f"/api/v1/manifests/{result.manifest.sop_instance_uid}"},
        )

    @extend_schema(
        parameters=[FilterInput],
        operation_id="v1_manifests_list",
        responses=inline_serializer(
            "ManifestPage",
            {
                "results": ManifestSummaryOutput(many=True),
                "next": serializers.CharField(allow_null=True),
            },
        ),
        summary="Find manifests by any patient identifier, dates, modality, institution, status",
    )
    def get(self, request: Request) -> Response:
        params = self.FilterInput(data=request.query_params)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        patient = None
        if data.get("issuer"):
            patient = selectors.patient_by_identifier(
                issuer=data["issuer"], value=data["patient_id"]
            )
        elif data.get("patient"):
            patient = access_patient(request.user, data["patient"])
        institution = access_institution(data["institution"]) if data.get("institution") else None
        filters = selectors.ManifestFilters(
            patient=patient,
            date_from=data.get("date_from"),
            date_to=data.get("date_to"),
            modality=data.get("modality"),
            institution=institution,
            status=None if data["status"] == "any" else data["status"],
            study_instance_uid=data.get("study_instance_uid"),
        )
        if data.get("issuer") and patient is None:
            page = selectors.ManifestPage(items=[], next_cursor=None)
        else:
            page = selectors.manifest_page(
                scope=manifests_visible_to(request.user),
                filters=filters,
                cursor=data.get("cursor"),
                limit=data["limit"],
            )
        with transaction.atomic():
            audit_record(
                code=EventCode.MANIFEST_QUERY,
                actor=actor_for(request),
                now=_now(),
                patient=patient_ref(patient) if patient is not None else None,
                objects=[{"type": "study", "uid": m.study_instance_uid} for m in page.items],
                details={
                    "query": {k: str(v) for k, v in data.items() if k not in {"cursor"}},
                    "results": len(page.items),
                },
            )
        next_url = None
        if page.next_cursor:
            query = request.query_params.copy()
            query["cursor"] = page.next_cursor
            next_url = request.build_absolute_uri(f"{request.path}?{query.urlencode()}")
        return Response(
            {"results": ManifestSummaryOutput(page.items, many=True).data, "next": next_url}
        )


class ManifestDetailApi(APIView):
    @extend_schema(responses=ManifestDetailOutput, summary="One manifest, with its series")
    def get(self, request: Request, sop_instance_uid: str) -> Response:
        manifest = access_manifest_by_uid(request.user, sop_instance_uid)
        services.manifest_read_record(
            manifest=manifest, actor=actor_for(request), now=_now(), document=False
        )
        return Response(ManifestDetailOutput(manifest).data)


class ManifestDocumentApi(APIView):
    """The KOS itself, as registered (XDS Retrieve Document Set of the manifest)."""

    @extend_schema(responses={(200, "application/dicom"): OpenApiTypes.BINARY})
    def get(self, request: Request, sop_instance_uid: str) -> HttpResponse:
        manifest = access_manifest_by_uid(request.user, sop_instance_uid)
        services.manifest_read_record(
            manifest=manifest, actor=actor_for(request), now=_now(), document=True
        )
        response = HttpResponse(bytes(manifest.kos_bytes), content_type="application/dicom")
        response["Digest"] = f"sha-256={manifest.kos_sha256}"
        response["Content-Disposition"] = f'attachment; filename="{manifest.sop_instance_uid}.dcm"'
        return response


class ManifestDeprecateApi(APIView):
    parser_classes = [JSONParser]

    class DeprecateInput(serializers.Serializer[Any]):
        reason = serializers.CharField(max_length=500)

    @extend_schema(
        request=DeprecateInput, responses=ManifestDetailOutput, summary="Deprecate a manifest"
    )
    def post(self, request: Request, sop_instance_uid: str) -> Response:
        manifest = access_manifest_by_uid(request.user, sop_instance_uid)
        if not can_deprecate_manifest(request.user, manifest):
            raise NotFound(f"No manifest {sop_instance_uid}")
        data = self.DeprecateInput(data=request.data)
        data.is_valid(raise_exception=True)
        manifest = services.manifest_deprecate(
            manifest=manifest,
            actor=actor_for(request),
            now=_now(),
            reason=data.validated_data["reason"],
        )
        return Response(ManifestDetailOutput(manifest).data)


# ---------------------------------------------------------------------------
# Patients and identity


class PatientLookupApi(APIView):
    class LookupInput(serializers.Serializer[Any]):
        issuer = serializers.CharField(max_length=64)
        value = serializers.CharField(max_length=64)

    @extend_schema(
        parameters=[LookupInput],
        responses=PatientOutput,
        operation_id="v1_patients_lookup",
        summary="Look up a regional patient by any identifier (local IPP + issuer, or INS + OID)",
    )
    def get(self, request: Request) -> Response:
        params = self.LookupInput(data=request.query_params)
        params.is_valid(raise_exception=True)
        found = selectors.patient_by_identifier(**params.validated_data)
        patient = (
            patients_visible_to(request.user).filter(pk=found.pk).first()
            if found is not None
            else None
        )
        with transaction.atomic():
            audit_record(
                code=EventCode.PATIENT_QUERY,
                actor=actor_for(request),
                now=_now(),
                patient=patient_ref(patient) if patient is not None else None,
                details={"query": dict(params.validated_data), "found": patient is not None},
            )
        if patient is None:
            raise NotFound("No such patient")
        return Response(_patient_output(patient))


class PatientDetailApi(APIView):
    @extend_schema(responses=PatientOutput, summary="A regional patient and all identifiers")
    def get(self, request: Request, public_id: uuid.UUID) -> Response:
        patient = access_patient(request.user, public_id)
        with transaction.atomic():
            audit_record(
                code=EventCode.PATIENT_QUERY,
                actor=actor_for(request),
                now=_now(),
                patient=patient_ref(patient),
                details={"patient": str(public_id)},
            )
        return Response(_patient_output(patient))


class IdentifierUnlinkApi(APIView):
    parser_classes = [JSONParser]

    class UnlinkInput(serializers.Serializer[Any]):
        issuer = serializers.CharField(max_length=64)
        value = serializers.CharField(max_length=64)
        reason = serializers.CharField(max_length=500)

    @extend_schema(
        request=UnlinkInput,
        responses={201: PatientOutput},
        summary="Detach an identifier into a new regional patient",
    )
    def post(self, request: Request) -> Response:
        data = self.UnlinkInput(data=request.data)
        data.is_valid(raise_exception=True)
        identifier = access_identifier_for_identity(
            request.user,
            issuer=data.validated_data["issuer"],
            value=data.validated_data["value"],
        )
        new_patient = identity.patient_unlink(
            identifier=identifier,
            actor=actor_for(request),
            now=_now(),
            comment=data.validated_data["reason"],
        )
        return Response(_patient_output(new_patient), status=status.HTTP_201_CREATED)


class CandidateOutput(serializers.ModelSerializer[LinkCandidate]):
    a = IdentifierOutput(source="identifier_a")
    b = IdentifierOutput(source="identifier_b")

    class Meta:
        model = LinkCandidate
        fields = ["id", "a", "b", "matched_on", "status", "created_at", "decided_at", "decided_by"]


class CandidateListApi(APIView):
    @extend_schema(responses=CandidateOutput(many=True), summary="Candidate links awaiting review")
    def get(self, request: Request) -> Response:
        visible = candidates_visible_to(request.user)
        return Response(CandidateOutput(visible, many=True).data)


class CandidateDecisionApi(APIView):
    parser_classes = [JSONParser]

    class DecisionInput(serializers.Serializer[Any]):
        decision = serializers.ChoiceField(choices=["confirm", "reject"])
        comment = serializers.CharField(max_length=500, required=False, default="")

    @extend_schema(
        request=DecisionInput,
        responses=CandidateOutput,
        summary="Confirm or reject a candidate link",
    )
    def post(self, request: Request, candidate_id: int) -> Response:
        candidate = access_candidate(request.user, candidate_id)
        data = self.DecisionInput(data=request.data)
        data.is_valid(raise_exception=True)
        candidate = identity.candidate_decide(
            candidate=candidate,
            confirm=data.validated_data["decision"] == "confirm",
            actor=actor_for(request),
            now=_now(),
            comment=data.validated_data["comment"],
        )
        return Response(CandidateOutput(candidate).data)


# ---------------------------------------------------------------------------
# Institutions


class InstitutionInput(serializers.Serializer[Any]):
    finess = serializers.CharField(max_length=9)
    name = serializers.CharField(max_length=200)
    patient_id_issuer = serializers.CharField(max_length=64)
    patient_id_issuer_oid = serializers.CharField(
        max_length=64, required=False, default="", allow_blank=True
    )
    ae_title = serializers.CharField(max_length=16, required=False, default="", allow_blank=True)
    dicom_host = serializers.CharField(max_length=255, required=False, default="", allow_blank=True)
    dicom_port = serializers.IntegerField(
        min_value=1, max_value=65535, required=False, allow_null=True, default=None
    )
    dicomweb_url = serializers.URLField(required=False, default="", allow_blank=True)
    dicom_tls_subject = serializers.CharField(
        max_length=255, required=False, default="", allow_blank=True
    )
    archive_transport = serializers.ChoiceField(
        choices=["", "dicomweb", "dimse"], required=False, default="", allow_blank=True
    )
    active = serializers.BooleanField(required=False, default=True)


class InstitutionCollectionApi(APIView):
    parser_classes = [JSONParser]

    @extend_schema(responses=InstitutionOutput(many=True), summary="The region's institutions")
    def get(self, request: Request) -> Response:
        return Response(InstitutionOutput(institutions_directory(), many=True).data)

    @extend_schema(
        request=InstitutionInput,
        responses={201: InstitutionOutput},
        summary="Onboard an institution",
    )
    def post(self, request: Request) -> Response:
        require_region_admin(request.user)
        data = InstitutionInput(data=request.data)
        data.is_valid(raise_exception=True)
        institution = services.institution_create(
            actor=actor_for(request), now=_now(), **data.validated_data
        )
        return Response(InstitutionOutput(institution).data, status=status.HTTP_201_CREATED)


class InstitutionDetailApi(APIView):
    parser_classes = [JSONParser]

    @extend_schema(responses=InstitutionOutput)
    def get(self, request: Request, finess: str) -> Response:
        return Response(InstitutionOutput(access_institution(finess)).data)

    @extend_schema(request=InstitutionInput(partial=True), responses=InstitutionOutput)
    def patch(self, request: Request, finess: str) -> Response:
        institution = access_institution(finess)
        if not can_administer_institution(request.user, institution):
            raise PermissionDenied(
                "Only the region's or this institution's administrators may change it"
            )
        data = InstitutionInput(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        changes = dict(data.validated_data)
        if "finess" in changes and changes.pop("finess") != institution.finess:
            raise InvalidInput(
                "The FINESS number of an institution cannot change",
                code="registry:institution:finess-immutable",
            )
        if {"active", "patient_id_issuer", "patient_id_issuer_oid"} & set(changes) and not (
            is_region_admin(request.user)
        ):
            raise PermissionDenied(
                "Only a regional administrator may activate an institution or change the "
                "domain of its patient IDs"
            )
        institution = services.institution_update(
            institution=institution, actor=actor_for(request), now=_now(), **changes
        )
        return Response(InstitutionOutput(institution).data)
