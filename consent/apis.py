"""REST interface of consent: record, withdraw and list directives; diagnose and export."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.parsers import JSONParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from audit.events import EventCode
from audit.services import audit_record
from broker.access import actor_for
from broker.errors import InvalidInput
from broker.identity import patient_ref
from broker.models import Institution
from consent import policy, selectors, services
from consent.access import (
    access_directive,
    access_patient_directives,
    access_patient_for_diagnosis,
    access_recording_institution,
)
from consent.models import DirectiveVersion


class VersionOutput(serializers.ModelSerializer[DirectiveVersion]):
    directive = serializers.IntegerField(source="directive_id")
    kind = serializers.CharField(source="directive.kind")
    recorded_at_institution = serializers.CharField(source="recorded_at_institution.finess")
    evidence_sha256 = serializers.SerializerMethodField()

    class Meta:
        model = DirectiveVersion
        fields = [
            "directive",
            "version",
            "kind",
            "scope",
            "value",
            "purposes",
            "valid_from",
            "valid_until",
            "withdrawn",
            "recorded_by",
            "recorded_at_institution",
            "recorded_at",
            "evidence_sha256",
            "note",
        ]

    def get_evidence_sha256(self, version: DirectiveVersion) -> str | None:
        return version.evidence.sha256 if version.evidence_id else None


class DirectiveValuesInput(serializers.Serializer[Any]):
    """What a directive says, as recorded or amended, and where it is recorded."""

    institution = serializers.CharField(max_length=9, help_text="FINESS where it is recorded")
    scope = serializers.ChoiceField(choices=[s.value for s in policy.Scope])
    value = serializers.CharField(max_length=64, required=False, default="", allow_blank=True)
    purposes = serializers.ListField(
        child=serializers.ChoiceField(choices=[p.value for p in policy.Purpose]),
        required=False,
        default=list,
    )
    valid_from = serializers.DateTimeField(required=False, allow_null=True, default=None)
    valid_until = serializers.DateTimeField(required=False, allow_null=True, default=None)
    note = serializers.CharField(max_length=2000, required=False, default="", allow_blank=True)
    evidence = serializers.FileField(required=False, help_text="PDF, PNG or JPEG")


class DirectiveOutput(serializers.Serializer[Any]):
    id = serializers.IntegerField()
    current = VersionOutput()
    history = VersionOutput(many=True)


class ReasonOutput(serializers.Serializer[Any]):
    rule = serializers.CharField()
    text = serializers.CharField()
    directive = serializers.IntegerField(allow_null=True)
    version = serializers.IntegerField(allow_null=True)


class ObligationOutput(serializers.Serializer[Any]):
    kind = serializers.CharField()
    study_instance_uid = serializers.CharField()


class DecisionOutput(serializers.Serializer[Any]):
    permit = serializers.BooleanField()
    rule = serializers.CharField()
    reasons = ReasonOutput(many=True)
    obligations = ObligationOutput(many=True)
    studies = serializers.ListField(child=serializers.CharField())


class ExportedDirectiveOutput(DirectiveOutput):
    policy_oid = serializers.CharField(help_text="the affinity domain's OID of its policy")


class ExportOutput(serializers.Serializer[Any]):
    patient = serializers.UUIDField()
    exported_at = serializers.DateTimeField()
    outside_care_team = serializers.CharField()
    policies = serializers.DictField(child=serializers.CharField())
    directives = ExportedDirectiveOutput(many=True)


def _directives_output(patient: Any) -> list[dict[str, Any]]:
    grouped: dict[int, list[dict[str, Any]]] = {}
    for version in selectors.directive_versions(patient=patient):
        grouped.setdefault(version.directive_id, []).append(VersionOutput(version).data)
    return [
        {"id": directive_id, "current": versions[-1], "history": versions}
        for directive_id, versions in grouped.items()
    ]


def _audit_read(request: Request, patient: Any, what: str) -> None:
    with transaction.atomic():
        audit_record(
            code=EventCode.CONSENT_READ,
            actor=actor_for(request),
            now=timezone.now(),
            patient=patient_ref(patient),
            details={"read": what},
        )


def _directive_input(
    serializer_class: type[serializers.Serializer[Any]], request: Request
) -> tuple[Institution, dict[str, Any]]:
    """The recording institution and the directive's values of a request (its evidence is
    read apart, by `_evidence`)."""
    data = serializer_class(data=request.data)
    data.is_valid(raise_exception=True)
    values = dict(data.validated_data)
    values.pop("evidence", None)
    return access_recording_institution(values.pop("institution")), values


def _evidence(request: Request) -> bytes | None:
    upload = request.FILES.get("evidence")
    if upload is None:
        return None
    if upload.size > settings.RELAIS_CONSENT_EVIDENCE_MAX_BYTES:
        raise InvalidInput(
            f"the evidence is larger than {settings.RELAIS_CONSENT_EVIDENCE_MAX_BYTES} bytes",
            code="consent:evidence:refused",
        )
    return bytes(upload.read())


class DirectiveCollectionApi(APIView):
    parser_classes = [JSONParser, MultiPartParser]

    class RecordInput(DirectiveValuesInput):
        kind = serializers.ChoiceField(choices=[k.value for k in policy.DirectiveKind])

    @extend_schema(
        responses=inline_serializer("DirectiveList", {"results": DirectiveOutput(many=True)}),
        summary="A patient's directives, each with its history",
    )
    def get(self, request: Request, public_id: uuid.UUID) -> Response:
        patient = access_patient_directives(request.user, public_id)
        _audit_read(request, patient, "list")
        return Response({"results": _directives_output(patient)})

    @extend_schema(
        request={"application/json": RecordInput, "multipart/form-data": RecordInput},
        responses={201: VersionOutput},
        summary="Record a directive on the patient's behalf",
    )
    def post(self, request: Request, public_id: uuid.UUID) -> Response:
        patient = access_patient_directives(request.user, public_id)
        institution, values = _directive_input(self.RecordInput, request)
        version = services.directive_record(
            patient=patient,
            institution=institution,
            recorder=request.user,
            evidence=_evidence(request),
            actor=actor_for(request),
            now=timezone.now(),
            **values,
        )
        return Response(VersionOutput(version).data, status=status.HTTP_201_CREATED)


class DirectiveWithdrawApi(APIView):
    parser_classes = [JSONParser, MultiPartParser]

    class WithdrawInput(serializers.Serializer[Any]):
        institution = serializers.CharField(max_length=9)
        note = serializers.CharField(max_length=2000, required=False, default="", allow_blank=True)
        evidence = serializers.FileField(required=False)

    @extend_schema(
        request={"application/json": WithdrawInput, "multipart/form-data": WithdrawInput},
        responses={201: VersionOutput},
        summary="Withdraw a directive (a new version)",
    )
    def post(self, request: Request, public_id: uuid.UUID, directive_id: int) -> Response:
        patient = access_patient_directives(request.user, public_id)
        directive = access_directive(patient, directive_id)
        data = self.WithdrawInput(data=request.data)
        data.is_valid(raise_exception=True)
        version = services.directive_withdraw(
            directive=directive,
            institution=access_recording_institution(data.validated_data["institution"]),
            recorder=request.user,
            evidence=_evidence(request),
            note=data.validated_data["note"],
            actor=actor_for(request),
            now=timezone.now(),
        )
        return Response(VersionOutput(version).data, status=status.HTTP_201_CREATED)


class DirectiveAmendApi(APIView):
    parser_classes = [JSONParser, MultiPartParser]

    class AmendInput(DirectiveValuesInput):
        pass

    @extend_schema(
        request={"application/json": AmendInput, "multipart/form-data": AmendInput},
        responses={201: VersionOutput},
        summary="Change a directive's scope, purposes or dates (a new version)",
    )
    def post(self, request: Request, public_id: uuid.UUID, directive_id: int) -> Response:
        patient = access_patient_directives(request.user, public_id)
        directive = access_directive(patient, directive_id)
        institution, values = _directive_input(self.AmendInput, request)
        version = services.directive_amend(
            directive=directive,
            institution=institution,
            recorder=request.user,
            evidence=_evidence(request),
            actor=actor_for(request),
            now=timezone.now(),
            **values,
        )
        return Response(VersionOutput(version).data, status=status.HTTP_201_CREATED)


class ConsentEvaluateApi(APIView):
    parser_classes = [JSONParser]

    class EvaluateInput(serializers.Serializer[Any]):
        professional = serializers.CharField(max_length=64)
        institution = serializers.CharField(max_length=9)
        relationship = serializers.ChoiceField(choices=[r.value for r in policy.Relationship])
        purpose = serializers.ChoiceField(choices=[p.value for p in policy.Purpose])
        studies = serializers.ListField(
            child=serializers.DictField(child=serializers.CharField(max_length=64)),
            min_length=1,
            max_length=1000,
            help_text='[{"study_instance_uid": ..., "source_institution": FINESS}]',
        )
        at = serializers.DateTimeField(required=False, allow_null=True, default=None)

    @extend_schema(
        request=EvaluateInput,
        responses=DecisionOutput,
        summary="Why the policy permits or denies (DPO)",
    )
    def post(self, request: Request, public_id: uuid.UUID) -> Response:
        patient = access_patient_for_diagnosis(request.user, public_id)
        data = self.EvaluateInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        try:
            studies = tuple(
                policy.StudyRef(s["study_instance_uid"], s["source_institution"])
                for s in values["studies"]
            )
        except KeyError as exc:
            raise InvalidInput(f"a study lacks {exc}", code="consent:evaluate:invalid") from exc
        now = timezone.now()
        decision = selectors.consent_evaluate(
            patient=patient,
            requester=policy.Requester(values["professional"], values["institution"]),
            relationship=policy.Relationship(values["relationship"]),
            purpose=policy.Purpose(values["purpose"]),
            studies=studies,
            now=values["at"] or now,
            as_recorded_at=values["at"],
        )
        body = {
            "permit": decision.permit,
            "rule": decision.rule.value,
            "reasons": [
                {
                    "rule": r.rule.value,
                    "text": r.text,
                    "directive": r.directive_id,
                    "version": r.directive_version,
                }
                for r in decision.reasons
            ],
            "obligations": [
                {"kind": o.kind, "study_instance_uid": o.study_instance_uid}
                for o in decision.obligations
            ],
            "studies": list(decision.studies),
        }
        with transaction.atomic():
            audit_record(
                code=EventCode.CONSENT_EVALUATE,
                actor=actor_for(request),
                now=now,
                patient=patient_ref(patient),
                purpose_of_use="diagnosis",
                details={"query": request.data, "decision": body},
            )
        return Response(body)


class ConsentExportApi(APIView):
    @extend_schema(
        responses=ExportOutput,
        summary="The patient's consent state, with the region's policy OIDs (DPO)",
    )
    def get(self, request: Request, public_id: uuid.UUID) -> Response:
        patient = access_patient_for_diagnosis(request.user, public_id)
        _audit_read(request, patient, "export")
        return Response(
            {
                "patient": str(patient.public_id),
                "exported_at": timezone.now(),
                "outside_care_team": settings.RELAIS_CONSENT_OUTSIDE_CARE_TEAM,
                "policies": settings.RELAIS_CONSENT_POLICY_OIDS,
                "directives": [
                    {**d, "policy_oid": settings.RELAIS_CONSENT_POLICY_OIDS[d["current"]["kind"]]}
                    for d in _directives_output(patient)
                ],
            }
        )
